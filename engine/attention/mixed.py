"""A step that decodes the running requests and prefills newly admitted ones in one forward.

The model sees one flat batch, decode tokens first; only attention differs between the two parts, so each
layer calls the backend twice, once per part, each with ordinary metadata. Any backend works unchanged: the
two calls write disjoint KV slots. A prefill may read a decoding sequence's pages (a prefix-cache hit on a
block whose last slot this very step's decode fills: the block manager registers a block's hash when it is
scheduled full), which is why the decode part runs first in every layer: its K/V are written before the
prefill part reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from etr.engine.attention.base import AttentionBackend, KVCache
from etr.engine.attention.metadata import AttentionMetadata


@dataclass(slots=True)
class MixedMetadata:
    """The two parts of a mixed step: ``num_decodes`` one-token decodes, then the prefills."""
    decode: AttentionMetadata
    prefill: AttentionMetadata
    num_decodes: int


class MixedAttention:
    """Runs ``backend`` over the decode part and the prefill part of a ``MixedMetadata`` step."""
    def __init__(self, backend: AttentionBackend):
        self.backend = backend
        self.name = backend.name

    def prepare(self, meta: MixedMetadata) -> None:
        self.backend.prepare(meta.decode)
        self.backend.prepare(meta.prefill)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
                meta: MixedMetadata, scale: float) -> torch.Tensor:
        d = meta.num_decodes
        out = torch.empty_like(q)
        out[:d] = self.backend.forward(q[:d], k[:d], v[:d], kv_cache, meta.decode, scale)
        out[d:] = self.backend.forward(q[d:], k[d:], v[d:], kv_cache, meta.prefill, scale)
        return out
