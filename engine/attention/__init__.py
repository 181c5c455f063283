"""Attention backends behind one interface; ``get_backend`` picks one by name."""

from etr.engine.attention.base import AttentionBackend, KVCache
from etr.engine.attention.metadata import AttentionMetadata, causal_metadata
from etr.engine.attention.torch_backend import TorchAttentionBackend
from etr.engine.attention.triton_backend import TritonAttentionBackend
from etr.errors import ConfigError
from etr.kernels import paged_attention

BACKENDS = {"torch": TorchAttentionBackend}
if paged_attention.triton is not None:
    BACKENDS["triton"] = TritonAttentionBackend


def get_backend(name: str, device) -> AttentionBackend:
    """The backend called ``name``: "torch", "triton" (opt-in), or "auto".

    "auto" stays on the torch backend everywhere until the Triton kernels have been measured compiled on a GPU
    (bench/RESULTS.md); they are verified on the CPU under TRITON_INTERPRET=1 only.
    """
    if name == "auto":
        name = "torch"
    if name not in BACKENDS:
        raise ConfigError(f"attention_backend {name!r} is not available; available: {sorted(BACKENDS)} or 'auto'")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "AttentionMetadata", "KVCache", "TorchAttentionBackend", "TritonAttentionBackend",
           "causal_metadata", "get_backend"]
