"""SwiGLU's activation in one pass: ``silu(gate) * up`` from the fused gate/up projection ``[tokens, 2 * I]``.

Computed in float32 and rounded once (the unfused torch ops round ``silu(gate)`` first: <= 1 ulp apart).
Only ``tl.exp`` is used, no libdevice. ``silu_mul_reference`` is the torch definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 1024

if triton is not None:
    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, N, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        gate = tl.load(gu_ptr + t * stride_gu + offs, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + t * stride_gu + N + offs, mask=ok, other=0.0).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + t * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch: ``silu(gate) * up`` in float32, rounded once to the input's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton: ``silu(gate) * up`` for ``gate_up`` ``[tokens, 2 * I]`` -> ``[tokens, I]``."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    tokens, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((tokens, n), device=gate_up.device, dtype=gate_up.dtype)
    _silu_mul_kernel[(tokens, triton.cdiv(n, BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                      BLOCK=BLOCK)
    return out
