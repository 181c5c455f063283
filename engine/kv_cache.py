"""The paged KV pool of one model: sizing from free memory, and allocation."""

from __future__ import annotations

import os

import torch

from etr.errors import KVCacheError
from etr.kernels import huge_pages
from etr.models.config import ModelConfig

# Share of free memory the pool may take when its size is not given. On the CPU the pool is allocated
# untouched, so pages the engine never touches cost no resident memory.
CPU_MEMORY_FRACTION = 0.3
GPU_MEMORY_FRACTION = 0.85


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """KV bytes one block takes across every layer (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's free bytes, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def size_kv_pools(engines: list) -> None:
    """Give every engine without a pool one, sized after all weights are loaded: per device, a share of its
    free memory split between the engines on it in proportion to what each wants (every sequence at
    ``max_model_len``), never more than that."""
    by_device: dict[torch.device, list] = {}
    for e in engines:
        if e.block_manager is None:
            by_device.setdefault(e.device, []).append(e)
    for device, group in by_device.items():
        fraction = GPU_MEMORY_FRACTION if device.type == "cuda" else CPU_MEMORY_FRACTION
        budget = free_memory_bytes(device) * fraction
        per_block = [bytes_per_block(e.model_config, e.block_size, e.config.dtype) for e in group]
        wanted = [e.config.max_num_seqs * -(-e.config.max_model_len // e.block_size) for e in group]
        total = sum(w * b for w, b in zip(wanted, per_block))
        scale = min(1.0, budget / total)
        for e, w, b in zip(group, wanted, per_block):
            blocks = int(w * scale)
            needed = -(-e.config.max_model_len // e.block_size)
            if blocks < needed:
                raise KVCacheError(f"only {blocks} KV blocks of {e.model_dir} fit in free memory on {device}; "
                                   f"one sequence of max_model_len={e.config.max_model_len} needs {needed}: "
                                   "lower max_model_len or max_num_seqs")
            e.init_kv(blocks)


def wants_huge_pages(device: torch.device) -> bool:
    """Whether a pool on ``device`` goes on transparent huge pages: on the CPU with ``ETR_CPU_HUGE_KV=1``
    (kernels/huge_pages.py says why not by default)."""
    return device.type == "cpu" and os.environ.get("ETR_CPU_HUGE_KV") == "1"


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                      packed_k: bool = False) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The pool ``[layers, 2, num_blocks, ...]`` and, per layer, views ``(k_pages, v_pages)`` of it, each
    ``[num_blocks, block_size, kv_heads, head_dim]`` (the layout flash-attn's paged decode and the Triton kernels
    share); with ``packed_k`` the K pages are ``[num_blocks, kv_heads, head_dim/2, block_size, 2]`` (the CPU decode
    op's packed layout, same bytes). A block's bytes are the same in either layout, so ``pool[:, :, b]`` is block
    ``b`` of every layer (see ``copy_kv_block``)."""
    if num_blocks < 1:
        raise KVCacheError(f"num_kv_blocks={num_blocks} must be >= 1")
    shape = (cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    try:
        pool = huge_pages.empty(shape, dtype) if wants_huge_pages(device) else torch.empty(shape, dtype=dtype,
                                                                                           device=device)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        raise KVCacheError(f"cannot allocate {num_blocks} KV blocks on {device}: {e}") from None
    if not packed_k:
        return pool, [(pool[i, 0], pool[i, 1]) for i in range(cfg.num_hidden_layers)]
    k_shape = (num_blocks, cfg.num_key_value_heads, cfg.head_dim // 2, block_size, 2)
    return pool, [(pool[i, 0].view(k_shape), pool[i, 1]) for i in range(cfg.num_hidden_layers)]


def copy_kv_block(pool: torch.Tensor | None, layers: list[tuple[torch.Tensor, torch.Tensor]], src: int,
                  dst: int) -> None:
    """Copy block ``src``'s K and V in every layer to block ``dst``: one op over ``pool`` when ``layers`` are its
    views, else layer by layer (block first in every layout)."""
    if pool is not None:
        pool[:, :, dst].copy_(pool[:, :, src])
        return
    for k, v in layers:
        k[dst].copy_(k[src])
        v[dst].copy_(v[src])
