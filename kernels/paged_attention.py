"""Paged decode attention (one query token per sequence), flash-decoding style.

Grid: (sequence, kv head, split). Each program walks its split's tokens 64 at a time, finding each token's
page through the block table, keeps an online softmax for the ``group`` query heads that share the kv head
(GQA without repeating K/V; the group is padded to 16 rows for tl.dot), and writes a partial output and its
log-sum-exp; a second kernel merges the splits (``combine_splits`` is its torch reference). The torch
backend's gather + attention is the reference for the whole. bf16 tiles go to tl.dot as they are on the GPU
(float32 accumulation); float32 models and the interpreter (whose bf16 is raw bits) multiply float32 tiles
in IEEE precision. Only tl.exp/tl.log are used, no libdevice.
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
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, lse_ptr, scale,
                             stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                             stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                             G, D, SPLIT_TOKENS, PAGE,
                             BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                             UPCAST: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        start = split * SPLIT_TOKENS
        end = tl.minimum(start + SPLIT_TOKENS, tl.load(ctx_ptr + b))
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kvh * G + g
        g_ok, d_ok = g < G, d < D
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for t0 in range(start, end, BLOCK_T):
            # BLOCK_T tokens at a time, whatever the page size: each token finds its page in the block table.
            t = t0 + tl.arange(0, BLOCK_T)
            valid = t < end
            block = tl.load(bt_ptr + b * stride_bt + t // PAGE, mask=valid, other=0).to(tl.int64)
            offs = block[:, None] * stride_kb + (t % PAGE)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            kv_mask = valid[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
            if UPCAST:  # float32 products: the interpreter's bf16 is raw bits; float32 models want ieee
                scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(valid[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        has = l > 0
        out = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        # A split past the context (a graph's fixed grid) writes only its -inf lse; the combine skips it.
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], out,
                 mask=(g_ok & (start + 0 * g < end))[:, None] & d_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_ok)


    @triton.jit
    def _combine_kernel(part_ptr, lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                        stride_ob, stride_oh, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s < S, other=float("-inf"))
        top = tl.max(lse, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: all weights 0
        w = tl.exp(lse - top)
        w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)
        live = (s < S) & (lse > float("-inf"))  # empty splits were never written: not read either
        part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                       mask=live[:, None] & (d[None, :] < D), other=0.0)
        out = tl.sum(w[:, None] * part, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def combine_splits(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Reference: merge per-split outputs ``[B, H, S, D]`` by their log-sum-exps ``[B, H, S]``."""
    weights = torch.softmax(lse, dim=-1).nan_to_num(0.0)
    return (weights[..., None] * out).sum(dim=2)


def combine_splits_triton(part: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The second launch: ``combine_splits`` as one program per (sequence, head), written in ``dtype``."""
    B, H, S, D = part.shape
    out = torch.empty((B, H, D), device=part.device, dtype=dtype)
    _combine_kernel[(B, H)](part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
                            lse.stride(1), out.stride(0), out.stride(1), S, D,
                            BLOCK_S=triton.next_power_of_2(S), BLOCK_D=triton.next_power_of_2(D))
    return out


# Programs to aim for in one launch on a GPU: a few per SM of an H100 (132 SMs), so that enough K/V loads are in
# flight to stream at bandwidth even at batch 1 (one program per sequence and KV head would be 4 programs for
# a Qwen2-7B shape). A split covers at least MIN_SPLIT_TOKENS, which keeps the float32 partials it writes
# and the combine reads to about a tenth of the K/V bytes it reads (7 query heads per KV head, head dim 128).
TARGET_PROGRAMS = 512
MIN_SPLIT_TOKENS = 128
BLOCK_T = 64  # tokens per step of a program's loop (two tl.dot tiles of [query heads x 64] and [64 x head dim])
NUM_WARPS = 8  # sm_90, head dim 128, bf16: 72 registers (4 warps: 150); neither spills. Unmeasured choice.


def split_plan(batch: int, kv_heads: int, max_pages: int, block_size: int, on_gpu: bool = True) -> tuple[int, int]:
    """``(pages_per_split, num_splits)`` for a decode launch over up to ``max_pages`` pages per sequence.
    Off the GPU (the interpreter runs programs one by one) one split covers everything."""
    max_pages = max(1, max_pages)
    if not on_gpu:
        return max_pages, 1
    min_pages = max(1, -(-MIN_SPLIT_TOKENS // block_size))
    splits = max(1, min(-(-TARGET_PROGRAMS // (batch * kv_heads)), max_pages // min_pages))
    per_split = -(-max_pages // splits)
    return per_split, -(-max_pages // per_split)


def paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, max_context: int, pages_per_split: int | None = None,
                 num_splits: int | None = None) -> torch.Tensor:
    """Triton: decode attention of ``q`` ``[B, H, D]`` over paged K/V ``[blocks, block_size, kv_heads, D]``,
    in two launches (split-K partials, then the combine).

    ``num_splits`` fixes the grid (a split past a sequence's context writes only a -inf log-sum-exp, which the
    combine weighs 0 without reading its partial), so a CUDA graph captured once serves every context up to ``num_splits * pages_per_split``
    pages; by default the splits follow ``max_context``, and ``pages_per_split`` follows ``split_plan``.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    B, H, D = q.shape
    _, block_size, kv_heads, _ = k_pages.shape
    if pages_per_split is None:
        pages_per_split = split_plan(B, kv_heads, triton.cdiv(max_context, block_size), block_size, q.is_cuda)[0]
    needed = max(1, triton.cdiv(triton.cdiv(max_context, block_size), pages_per_split))
    if num_splits is not None and num_splits < needed:
        raise ValueError(f"num_splits={num_splits} cannot cover max_context={max_context} "
                         f"({needed} splits of {pages_per_split} pages of {block_size} tokens)")
    splits = num_splits or needed
    out = torch.empty((B, H, splits, D), device=q.device, dtype=torch.float32)
    lse = torch.empty((B, H, splits), device=q.device, dtype=torch.float32)
    group = H // kv_heads
    _paged_decode_kernel[(B, kv_heads, splits)](
        q, k_pages, v_pages, block_tables, context_lens, out, lse, scale,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        group, D, pages_per_split * block_size, block_size, BLOCK_T=BLOCK_T,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot: >= 16
        UPCAST=q.dtype == torch.float32 or interpreted(), num_warps=NUM_WARPS)
    return combine_splits_triton(out, lse, q.dtype)
