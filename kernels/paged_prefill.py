"""Paged prefill attention: new tokens attend causally to their sequence's whole context in KV pages.

A prefix-cache hit leaves part of the context in pages already; the KV write puts the new tokens' K/V there
too, so one kernel reads every key through the block table (no gather, no copy of the prefix).
Grid: (sequence, query head, query tile of BLOCK_M new tokens). Query i of a sequence with ``q_len`` new and
``ctx`` total tokens sits at position ``ctx - q_len + i`` and sees keys ``0..that position``. GQA maps query
head h to kv head ``h // group``. Online softmax in float32; ``UPCAST`` turns tiles to float32 and the dots
to IEEE float32 (the interpreter's bf16 is raw bits; float32 engines want exact products), otherwise bf16
tiles feed the tensor cores. ``paged_prefill_reference`` is the torch backend's SDPA path.
"""

from __future__ import annotations

import torch

from etr.kernels import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, cu_q_ptr, ctx_ptr, scale,
                              stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_ot, stride_oh, stride_bt,
                              G, D, PAGE,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              UPCAST: tl.constexpr):
        seq = tl.program_id(0)
        h = tl.program_id(1)
        tile = tl.program_id(2)
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
        if tile * BLOCK_M < q_len:
            ctx = tl.load(ctx_ptr + seq)
            m_idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            d = tl.arange(0, BLOCK_D)
            m_ok, d_ok = m_idx < q_len, d < D
            q = tl.load(q_ptr + (q_start + m_idx)[:, None] * stride_qt + h * stride_qh + d[None, :],
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            q_pos = ctx - q_len + m_idx
            kvh = h // G
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            last = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_M)  # causal: later keys are never seen
            for start in range(0, last, BLOCK_N):
                n_idx = start + tl.arange(0, BLOCK_N)
                n_ok = n_idx < last
                block = tl.load(bt_ptr + seq * stride_bt + n_idx // PAGE, mask=n_ok, other=0).to(tl.int64)
                offs = block[:, None] * stride_kb + (n_idx % PAGE)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
                kv_mask = n_ok[:, None] & d_ok[None, :]
                k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
                v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                else:
                    s = tl.dot(q, tl.trans(k)) * scale
                seen = (n_idx[None, :] <= q_pos[:, None]) & n_ok[None, :]
                s = tl.where(seen, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                if UPCAST:
                    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
            out = acc / l[:, None]
            tl.store(out_ptr + (q_start + m_idx)[:, None] * stride_ot + h * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def paged_prefill(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, max_query_len: int, scale: float,
                  block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Triton: ``q`` ``[new tokens, H, D]`` (sequences back to back, offsets ``cu_seqlens_q``) over paged K/V
    ``[blocks, page, kv_heads, D]`` that already hold every context token, the new ones included.
    Tiles default to 64x64 on the GPU and 32x32 under the interpreter (fewer wasted rows per program there)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    block_m = block_m or (64 if q.is_cuda else 32)
    block_n = block_n or (64 if q.is_cuda else 32)
    tokens, H, D = q.shape
    _, page, kv_heads, _ = k_pages.shape
    out = torch.empty_like(q)
    upcast = q.dtype == torch.float32 or interpreted()
    grid = (len(context_lens), H, triton.cdiv(max_query_len, block_m))
    _paged_prefill_kernel[grid](
        q, k_pages, v_pages, out, block_tables, cu_seqlens_q, context_lens, scale,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), out.stride(0),
        out.stride(1), block_tables.stride(0), H // kv_heads, D, page,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)), UPCAST=upcast,
        num_warps=8 if block_m >= 64 else 4)  # sm_90, 64x64, head dim 128, bf16: 141 registers (4 warps: 190)
    return out


def paged_prefill_reference(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                            block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
                            scale: float) -> torch.Tensor:
    """Plain torch: gather each sequence's context through its block table, then SDPA with the causal mask
    offset by the cached prefix."""
    page = k_pages.shape[1]
    out, start = torch.empty_like(q), 0
    for i, (n, ctx) in enumerate(zip(query_lens, context_lens)):
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[i].to(q.device)[pos // page].long() * page + pos % page
        k, v = (p.reshape(-1, *p.shape[2:])[slots].transpose(0, 1) for p in (k_pages, v_pages))
        mask = pos[None, :] <= pos[ctx - n:, None]
        o = torch.nn.functional.scaled_dot_product_attention(q[start:start + n].transpose(0, 1), k, v,
                                                             attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + n] = o.transpose(0, 1)
        start += n
    return out
