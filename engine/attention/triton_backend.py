"""Triton paged attention: the KV write and decode run as Triton kernels; prefill reuses the torch path
(SDPA on the new tokens, plus the gathered cached prefix on a prefix-cache hit)."""

from __future__ import annotations

import torch

from etr.engine.attention.base import KVCache
from etr.engine.attention.metadata import AttentionMetadata
from etr.engine.attention.torch_backend import TorchAttentionBackend
from etr.kernels.kv_write import write_kv
from etr.kernels.paged_attention import paged_decode


class TritonAttentionBackend(TorchAttentionBackend):
    name = "triton"

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.is_prefill:
            super().prepare(meta)  # the torch prefill needs its gathered prefix slots

    def forward(self, q, k, v, kv_cache: KVCache | None, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if kv_cache is not None:
            write_kv(kv_cache, k, v, meta.slot_mapping)
        if meta.is_prefill:
            return self._prefill(q, k, v, kv_cache, meta, scale)
        k_pages, v_pages = kv_cache
        return paged_decode(q, k_pages, v_pages, meta.block_tables, meta.context_lens, scale,
                            max(meta.context_lens_list))
