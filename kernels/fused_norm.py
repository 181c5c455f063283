"""Residual add + RMSNorm in one pass over the row (one program per token).

``fused_add_rms_norm(x, residual, weight, eps)`` returns ``(normed, x + residual)``: the sum is rounded to the
activations' dtype and the norm is taken of that rounded sum, as the unfused ``x = x + r; norm(x)`` does, and
the norm rounds where transformers' does (the normalized row, then its product with the weight). ``residual=None`` is a plain
RMSNorm that hands ``x`` back as the residual. ``fused_add_rms_norm_reference`` is the torch definition.
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
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o, stride_s, N, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        ok = offs < N
        x = tl.load(x_ptr + t * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(r_ptr + t * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
            rounded = x.to(sum_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # torch's add rounds so
            tl.store(sum_ptr + t * stride_s + offs, rounded, mask=ok)
            x = rounded.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # Rounded where transformers rounds: the normalized row, then its product with the weight.
        normed = (x * inv).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(out_ptr + t * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch: ``s = x + residual`` in x's dtype, then transformers' RMSNorm of it (normalized in float32,
    rounded to x's dtype, times the weight)."""
    s = x if residual is None else x + residual
    s32 = s.float()
    return weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), s


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: ``(rms_norm(x + residual) * weight, x + residual)`` for ``x`` ``[tokens, hidden]``."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens, n = x.shape
    out = torch.empty_like(x)
    if residual is None:
        total, r = x, x
    else:
        r = residual if residual.stride(-1) == 1 else residual.contiguous()
        total = torch.empty_like(x)
    _add_rms_norm_kernel[(tokens,)](x, r, weight, out, total, x.stride(0), r.stride(0), out.stride(0),
                                    total.stride(0), n, eps, HAS_RESIDUAL=residual is not None,
                                    BLOCK=triton.next_power_of_2(n))
    return out, total
