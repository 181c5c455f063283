"""Rotary embeddings applied in place to the q and k heads of a fused qkv output (one program per token).

Reads the float32 cos/sin tables at each token's position itself (no gathered per-step copies) and rotates
in float32, rounding once. The tables hold ``cat(freqs, freqs)``, so the first half of a row serves both
halves. ``rotary_reference`` is the torch definition (the model's ``apply_rotary`` on float32 tables).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_table, HEADS, HALF,
                       BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        ok = (h[:, None] < HEADS) & (d[None, :] < HALF)
        c = tl.load(cos_ptr + pos * stride_table + d, mask=d < HALF, other=0.0)[None, :]
        s = tl.load(sin_ptr + pos * stride_table + d, mask=d < HALF, other=0.0)[None, :]
        first = x_ptr + t * stride_xt + h[:, None] * stride_xh + d[None, :]
        x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
        tl.store(first, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=ok)
        tl.store(first + HALF, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=ok)


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Torch: ``x`` ``[tokens, heads, head_dim]`` rotated in float32 by the tables' rows at ``positions``."""
    from etr.models.rope import apply_rotary
    return apply_rotary(x.float(), cos[positions], sin[positions]).to(x.dtype)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton, in place: rotate every head of ``x`` ``[tokens, heads, head_dim]`` (last dim contiguous) by the
    float32 tables ``[max_positions, head_dim]`` at ``positions``; returns ``x``."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if x.stride(-1) != 1:
        raise ValueError(f"rotary_ needs the head dimension contiguous, got strides {x.stride()}")
    tokens, heads, dim = x.shape
    half = dim // 2
    _rotary_kernel[(tokens,)](x, positions, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads, half,
                              BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(half))
    return x
