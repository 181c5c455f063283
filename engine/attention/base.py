"""The interface every attention backend implements."""

from __future__ import annotations

from typing import Protocol

import torch

from etr.engine.attention.metadata import AttentionMetadata

# (k_pages, v_pages), each [num_blocks, block_size, kv_heads, head_dim]; on the CPU a bf16 pool's K may be packed,
# [num_blocks, kv_heads, head_dim/2, block_size, 2] (kernels/cpu_paged_decode.py, pack_k).
KVCache = tuple[torch.Tensor, torch.Tensor]


class AttentionBackend(Protocol):
    """What the model calls for attention: ``prepare`` once per step, ``forward`` per layer."""
    name: str

    def prepare(self, meta: AttentionMetadata) -> None:
        """Derive per-step tensors (shared by all layers) into ``meta.extra``; called once per step."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Write k/v of the new tokens into ``kv_cache`` (when given) and return attention output.

        q: ``[tokens, heads, head_dim]``, k/v: ``[tokens, kv_heads, head_dim]``; returns ``[tokens, heads, head_dim]``.
        """
