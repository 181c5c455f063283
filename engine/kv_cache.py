"""The paged KV pool of one model: sizing from free memory, and allocation."""

from __future__ import annotations

import torch

from etr.errors import KVCacheError
from etr.models.config import ModelConfig

# Share of free memory the pool may take when its size is not given. On the CPU the pool is allocated
# with torch.empty, so pages the engine never touches cost no resident memory.
CPU_MEMORY_FRACTION = 0.3
GPU_MEMORY_FRACTION = 0.85


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def num_blocks_for(cfg: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                   max_num_seqs: int, max_model_len: int) -> int:
    """Blocks for every sequence at full length, capped by a share of the device's free memory."""
    wanted = max_num_seqs * -(-max_model_len // block_size)
    fraction = GPU_MEMORY_FRACTION if device.type == "cuda" else CPU_MEMORY_FRACTION
    affordable = int(free_memory_bytes(device) * fraction) // bytes_per_block(cfg, block_size, dtype)
    blocks = min(wanted, affordable)
    needed = -(-max_model_len // block_size)
    if blocks < needed:
        raise KVCacheError(f"only {blocks} KV blocks fit in free memory on {device}; one sequence of "
                           f"max_model_len={max_model_len} needs {needed}: lower max_model_len")
    return blocks


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(k_pages, v_pages)``, each ``[num_blocks, block_size, kv_heads, head_dim]`` (the layout
    flash-attn's paged decode and the Triton kernels share)."""
    if num_blocks < 1:
        raise KVCacheError(f"num_kv_blocks={num_blocks} must be >= 1")
    shape = (cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    try:
        pool = torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        raise KVCacheError(f"cannot allocate {num_blocks} KV blocks on {device}: {e}") from None
    return [(pool[i, 0], pool[i, 1]) for i in range(cfg.num_hidden_layers)]
