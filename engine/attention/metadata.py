"""What an attention backend needs to know about one step's flattened batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """One step's batch layout.

    Prefill: ``query_lens[i]`` new tokens of sequence i follow ``context_lens[i] - query_lens[i]`` tokens
    already in its KV pages (a prefix-cache hit). Decode: one new token per sequence.
    ``slot_mapping[t]`` is the flat KV slot (block * block_size + offset) token t is written to;
    ``block_tables`` is ``[batch, max_blocks]`` int32, padded with 0. Python lists mirror the lengths so
    CPU-side loops never synchronise with the device.
    """
    is_prefill: bool
    query_lens: list[int]
    context_lens_list: list[int]
    cu_seqlens_q: torch.Tensor
    slot_mapping: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    block_size: int = 16
    dtype: torch.dtype = torch.float32  # activations' dtype (for masks built once per step)
    has_padding: bool = False  # rows with slot -1 (a CUDA graph's padded batch) may be present
    extra: dict = field(default_factory=dict)  # backend-specific tensors, built once per step by prepare()

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def has_cached_prefix(self) -> bool:
        return any(c != q for c, q in zip(self.context_lens_list, self.query_lens))


def causal_metadata(query_lens: list[int], device: torch.device | str) -> AttentionMetadata:
    """Metadata for a cache-free forward (every sequence attends causally to itself only)."""
    cu = torch.tensor([0] + query_lens, device=device).cumsum(0).to(torch.int32)
    return AttentionMetadata(is_prefill=True, query_lens=list(query_lens), context_lens_list=list(query_lens),
                             cu_seqlens_q=cu)
