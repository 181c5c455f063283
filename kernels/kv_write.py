"""Scatter new tokens' K/V into their pages by ``slot_mapping`` (one program per token).

Slot -1 marks a padding token (a padded CUDA-graph batch) and is skipped. ``write_kv_reference`` is the
plain-torch definition (the torch attention backend's own ``write_kv``).
"""

from __future__ import annotations

import torch

from etr.engine.attention.torch_backend import write_kv as write_kv_reference

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["write_kv", "write_kv_reference"]

if triton is not None:
    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v, N,
                         BLOCK: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            offs = tl.arange(0, BLOCK)
            ok = offs < N
            # Pure copies: no arithmetic on the values, so bf16 is exact under the interpreter too.
            tl.store(k_cache_ptr + slot * N + offs, tl.load(k_ptr + t * stride_k + offs, mask=ok), mask=ok)
            tl.store(v_cache_ptr + slot * N + offs, tl.load(v_ptr + t * stride_v + offs, mask=ok), mask=ok)


def write_kv(kv_cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Triton: ``k``/``v`` ``[tokens, kv_heads, head_dim]`` into pages ``[num_blocks, block_size, kv_heads,
    head_dim]`` at ``slot_mapping`` (int, -1 = skip)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    k_cache, v_cache = kv_cache
    n = k.shape[1] * k.shape[2]
    k2, v2 = k.reshape(k.shape[0], n), v.reshape(v.shape[0], n)
    if k2.stride(1) != 1 or v2.stride(1) != 1:
        k2, v2 = k2.contiguous(), v2.contiguous()
    _write_kv_kernel[(k.shape[0],)](k2, v2, k_cache, v_cache, slot_mapping, k2.stride(0), v2.stride(0), n,
                                    BLOCK=triton.next_power_of_2(n))
