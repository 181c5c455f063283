"""Triton paged attention: KV write, prefill over pages (prefix hits included) and split-K decode all run as
Triton kernels; a cache-free forward (loss computation) falls back to the torch path."""

from __future__ import annotations

import torch

from etr.engine.attention.base import KVCache
from etr.engine.attention.metadata import AttentionMetadata
from etr.engine.attention.torch_backend import TorchAttentionBackend
from etr.kernels.kv_write import write_kv
from etr.kernels.paged_attention import paged_decode
from etr.kernels.paged_prefill import paged_prefill


class TritonAttentionBackend(TorchAttentionBackend):
    """Attention through the Triton KV-write, paged-prefill and split-K decode kernels."""
    name = "triton"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Nothing to derive: the kernels read block tables and lengths as they are."""

    def forward(self, q, k, v, kv_cache: KVCache | None, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if kv_cache is None:
            return super().forward(q, k, v, None, meta, scale)
        write_kv(kv_cache, k, v, meta.slot_mapping)
        k_pages, v_pages = kv_cache
        if meta.is_prefill:
            return paged_prefill(q, k_pages, v_pages, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                                 max(meta.query_lens), scale)
        return paged_decode(q, k_pages, v_pages, meta.block_tables, meta.context_lens, scale,
                            max(meta.context_lens_list), meta.extra.get("pages_per_split"), meta.extra.get("num_splits"))
