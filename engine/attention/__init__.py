"""Attention backends behind one interface; ``resolve_backend`` picks one, ``get_backend`` builds it."""

import torch

from etr.engine.attention.base import AttentionBackend, KVCache
from etr.engine.attention.flash_backend import PAGE_MULTIPLE, FlashAttentionBackend, flash_module
from etr.engine.attention.metadata import AttentionMetadata, causal_metadata
from etr.engine.attention.torch_backend import TorchAttentionBackend
from etr.engine.attention.triton_backend import TritonAttentionBackend
from etr.errors import ConfigError
from etr.kernels import paged_attention

BACKENDS = {"torch": TorchAttentionBackend, "flash": FlashAttentionBackend}
if paged_attention.triton is not None:
    BACKENDS["triton"] = TritonAttentionBackend


def resolve_backend(name: str, device: torch.device) -> str:
    """"auto": flash-attn on CUDA when it imports, else the Triton kernels on CUDA, else torch.

    The Triton path (and the CUDA graphs it enables) is verified on the CPU under TRITON_INTERPRET=1 and has
    not yet run compiled on a GPU here; ``attention_backend="torch"`` is the fallback if it misbehaves.
    """
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if on_cuda and flash_module() is not None:
            return "flash"
        return "triton" if on_cuda and "triton" in BACKENDS else "torch"
    if name == "flash" and flash_module() is None:
        raise ConfigError("attention_backend 'flash' needs flash_attn (pip install 'expert-token-routing[flash]')")
    if name not in BACKENDS:
        raise ConfigError(f"attention_backend {name!r} is not available; available: {sorted(BACKENDS)} or 'auto'")
    return name


def block_size_for(backend: str, block_size: int | None) -> int:
    """The KV page size: 256 for flash-attn's paged KV (it needs multiples of 256), else 16."""
    if block_size is None:
        return PAGE_MULTIPLE if backend == "flash" else 16
    if block_size < 1 or (backend == "flash" and block_size % PAGE_MULTIPLE):
        need = f"a multiple of {PAGE_MULTIPLE}" if backend == "flash" else ">= 1"
        raise ConfigError(f"block_size={block_size} does not suit attention backend {backend!r}: use {need}")
    return block_size


def get_backend(name: str, device) -> AttentionBackend:
    """An instance of the backend ``name`` resolves to (the torch backend knows its device)."""
    resolved = resolve_backend(name, device)
    return TorchAttentionBackend(device) if resolved == "torch" else BACKENDS[resolved]()


__all__ = ["AttentionBackend", "AttentionMetadata", "KVCache", "FlashAttentionBackend", "TorchAttentionBackend",
           "TritonAttentionBackend", "block_size_for", "causal_metadata", "get_backend", "resolve_backend"]
