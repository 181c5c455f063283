"""Decode attention on the CPU that reads the KV pages in place (``cpu_paged_decode.cpp``, a torch C++ op).

The torch backend's decode otherwise gathers every sequence's context out of its pages and converts it to
float32 as a whole, each step and each layer; this kernel reads each key and value row once where it lies,
with float32 arithmetic. It is compiled on first use (kernels/cpp_op.py), and where it cannot be built the backend keeps the gather
path (``available()`` says which, ``load_error()`` why).
``reference`` is the plain-torch computation it is tested against.
"""

from __future__ import annotations

import os

import torch

from etr.kernels.cpp_op import CppOp

OP = CppOp("cpu_paged_decode.cpp", "CPU decode-attention op", "ETR_CPU_PAGED_DECODE")


def available() -> bool:
    """Whether the op is loaded, compiling it first if needed (once per process; tens of seconds the first
    time on a machine). ``ETR_CPU_PAGED_DECODE=0`` turns it off."""
    return OP.available()


def load_error() -> str | None:
    """Why the op is not available (None when it is, or before ``available()`` was asked)."""
    return OP.error


def paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence: ``q`` ``[B, H, D]`` against the first ``context_lens[b]`` positions of
    sequence b's pages (``[num_blocks, block_size, kv_heads, D]``, named by its row of ``block_tables``, int32);
    query head h reads KV head ``h // (H // kv_heads)``. ``k_pages`` may be packed (``pack_k``; bf16 only, see
    ``packs_k``). Returns ``[B, H, D]`` in ``q``'s dtype."""
    return torch.ops.etr_cpu.paged_decode(q, k_pages, v_pages, block_tables, context_lens, scale)


def bf16_path(head_dim: int) -> bool:
    """Whether a bf16 query of ``head_dim`` takes the op's AVX512-BF16 path (head sizes 32 to 128 in steps of
    32, in a build for a CPU with the instruction) rather than its generic float32 loop."""
    return torch.ops.etr_cpu.bf16_path(head_dim)


def reference(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
              context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``paged_decode`` in plain torch, one sequence at a time, in float32."""
    k_pages = unpack_k(k_pages)
    block_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    out = torch.empty_like(q)
    for b, n in enumerate(context_lens.tolist()):
        pos = torch.arange(n)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_pages.flatten(0, 1)[slots].float().transpose(0, 1)  # [kv_heads, n, D]
        v = v_pages.flatten(0, 1)[slots].float().transpose(0, 1)
        qb = q[b].float().view(kv_heads, -1, q.shape[2])          # [kv_heads, group, D]
        probs = (qb @ k.transpose(1, 2) * scale).softmax(-1)
        out[b] = (probs @ v).reshape(q.shape[1], q.shape[2]).to(q.dtype)
    return out


def set_values_stream(on: bool) -> bool:
    """Turn the bf16 path's values pass streaming its own V rows on or off (process-wide; on unless
    ``ETR_CPU_ATTN_V_STREAM=0``) and return the previous setting. It changes timings only, never a result: on,
    each of the two passes streams its own pages into L2 ahead of its loads, so that the memory works through
    both; off, the values pass fetches its rows into L1 16 positions ahead, and with packed K the scores pass
    also fetches the V pages one page ahead (cpu_paged_decode.cpp, bench/RESULTS.md). Where the op does not
    take its bf16 path (``bf16_path``), it switches nothing."""
    return bool(torch.ops.etr_cpu.set_values_stream(bool(on)))


def packed_positions() -> int:
    """What a packed K pool's page size must be a multiple of (16: one 64-byte load holds one dimension pair of
    16 positions)."""
    return torch.ops.etr_cpu.packed_positions()


def packs_k(dtype: torch.dtype, head_dim: int, block_size: int) -> bool:
    """Whether a CPU pool of ``dtype``, ``head_dim`` and pages of ``block_size`` gets packed K pages: the op's
    bf16 path reads them (scores of 16 positions per dot instruction, no sums across lanes).
    ``ETR_CPU_PACK_K=0`` keeps the row layout."""
    return (os.environ.get("ETR_CPU_PACK_K", "1") != "0" and available() and dtype == torch.bfloat16
            and bf16_path(head_dim) and block_size % packed_positions() == 0)


def pack_k(pages: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_size, kv_heads, D]`` K pages in the packed layout the op reads fastest,
    ``[num_blocks, kv_heads, D/2, block_size, 2]``: a page's keys of one KV head as pairs of dimensions, position
    after position (a copy)."""
    n, bs, kv, d = pages.shape
    return pages.view(n, bs, kv, d // 2, 2).permute(0, 2, 3, 1, 4).contiguous()


def unpack_k(pages: torch.Tensor) -> torch.Tensor:
    """``pack_k`` undone: ``[num_blocks, block_size, kv_heads, D]`` (a copy); 4-d pages are returned as they
    are."""
    if pages.dim() == 4:
        return pages
    n, kv, half, bs, _ = pages.shape
    return pages.permute(0, 3, 1, 2, 4).reshape(n, bs, kv, 2 * half)
