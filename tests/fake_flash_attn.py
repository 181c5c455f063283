"""A torch model of the two flash-attn functions the flash backend calls, written from their documented
semantics (flash-attn 2.5+ docstrings): varlen attention, paged K/V through ``block_table``, GQA, and causal
masks aligned to the bottom-right when there are more keys than queries. Slow and simple on purpose."""

import torch


def _attend(q, k, v, scale, causal):
    """q ``[Lq, H, D]``, k/v ``[Lk, Hk, D]``."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)


def _paged(pages, table_row, length):
    page = pages.shape[1]
    blocks = table_row[: -(-length // page)].long()
    return pages[blocks].reshape(-1, *pages.shape[2:])[:length]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, block_table=None, **_):
    scale = softmax_scale or q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
        if block_table is None:
            ki, vi = k[ks:ke], v[ks:ke]
        else:
            ki, vi = _paged(k, block_table[i], ke - ks), _paged(v, block_table[i], ke - ks)
        out[qs:qe] = _attend(q[qs:qe], ki, vi, scale, causal)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                            softmax_scale=None, causal=False, **_):
    assert k is None and v is None, "the backend writes K/V itself"
    assert block_table is None or k_cache.shape[1] % 256 == 0, "paged KV needs pages of a multiple of 256"
    scale = softmax_scale or q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        out[b] = _attend(q[b], _paged(k_cache, block_table[b], n), _paged(v_cache, block_table[b], n), scale, causal)
    return out
