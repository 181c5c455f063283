"""flash-attn backend: a thin adapter, used on CUDA when ``flash_attn`` imports.

Prefill is ``flash_attn_varlen_func`` over the paged cache (``block_table``), so a prefix-cache hit attends to
its cached pages with no gather; decode is ``flash_attn_with_kvcache`` with ``block_table`` and
``cache_seqlens``. Causal masks are bottom-right aligned by flash-attn, which is what a query block that
follows a cached prefix needs. flash-attn's paged KV wants pages of a multiple of 256 tokens (flash-attn
2.5+, ``flash_api.cpp``), hence ``PAGE_MULTIPLE``. KV layout ``[blocks, block_size, kv_heads, head_dim]`` is
the one every backend shares. New K/V are written by the Triton write kernel (torch where Triton is absent).

flash-attn has no wheel for these machines: this adapter is exercised against the real library only where it
is installed; the tests run it against a torch model of the two functions' documented semantics.
"""

from __future__ import annotations

import importlib

import torch

from etr.engine.attention.base import KVCache
from etr.engine.attention.metadata import AttentionMetadata
from etr.engine.attention.torch_backend import write_kv as write_kv_torch

PAGE_MULTIPLE = 256


def flash_module():
    """``flash_attn`` when it imports, else None."""
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


class FlashAttentionBackend:
    """Attention through flash-attn's varlen and paged-KV functions (see the module docstring)."""
    name = "flash"

    def __init__(self):
        self.fa = flash_module()
        if self.fa is None:
            raise ImportError("flash_attn is not installed")
        from etr.kernels import kv_write
        self.write = kv_write.write_kv if kv_write.triton is not None else write_kv_torch

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.block_tables is None:
            return
        meta.extra["block_table"] = meta.block_tables.to(torch.int32)
        if meta.is_prefill:
            meta.extra["cu_seqlens_k"] = torch.nn.functional.pad(meta.context_lens.cumsum(0), (1, 0)).to(torch.int32)
        else:
            meta.extra["cache_seqlens"] = meta.context_lens.to(torch.int32)

    def forward(self, q, k, v, kv_cache: KVCache | None, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if kv_cache is None:  # cache-free forward (loss computation): plain varlen attention
            cu = meta.cu_seqlens_q.to(torch.int32)
            longest = max(meta.query_lens)
            return self.fa.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=True)
        self.write(kv_cache, k, v, meta.slot_mapping)
        k_pages, v_pages = kv_cache
        if meta.is_prefill:
            return self.fa.flash_attn_varlen_func(
                q, k_pages, v_pages, meta.cu_seqlens_q.to(torch.int32), meta.extra["cu_seqlens_k"],
                max(meta.query_lens), max(meta.context_lens_list), softmax_scale=scale, causal=True,
                block_table=meta.extra["block_table"])
        out = self.fa.flash_attn_with_kvcache(q.unsqueeze(1), k_pages, v_pages,
                                              cache_seqlens=meta.extra["cache_seqlens"],
                                              block_table=meta.extra["block_table"], softmax_scale=scale,
                                              causal=True)
        return out.squeeze(1)
