"""Attention backends behind one interface; ``get_backend`` picks one by name."""

from etr.engine.attention.base import AttentionBackend, KVCache
from etr.engine.attention.metadata import AttentionMetadata, causal_metadata
from etr.engine.attention.torch_backend import TorchAttentionBackend

BACKENDS = {"torch": TorchAttentionBackend}


def get_backend(name: str, device) -> AttentionBackend:
    """The backend called ``name``; "auto" is the plain-torch backend until faster ones are registered."""
    if name == "auto":
        name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "AttentionMetadata", "KVCache", "TorchAttentionBackend", "causal_metadata", "get_backend"]
