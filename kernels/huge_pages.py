"""A model's packed CPU weights, and a CPU KV pool, on transparent huge pages.

torch allocates a tensor on the host's 4 KB pages unless the process was started with
``THP_MEM_ALLOC_ENABLE=1``. A batch-1 decode step then crosses every page of its ~270 MB of weights once:
~66,000 pages, far more than the TLB holds. Each new page needs a page walk, and the hardware
prefetchers stop at the page's edge. So ``together`` copies the weights into one anonymous private mapping,
advised ``MADV_HUGEPAGE`` before anything touches it. In the order a step reads them, the weights then sit on
2 MB pages, one stream after the other: faster decode steps at every batch size measured (bench/RESULTS.md,
``bench/knob_ab.py --knob huge_pages``).

``empty`` allocates a CPU KV pool the same way: a step reads its sequences' pages all over the pool, which paid
at batch 16 and long contexts (``--knob huge_kv``).

The bits are unchanged, and so is every shape and stride. Where the kernel has no transparent huge pages
(``supported``), or where ``ETR_CPU_HUGE_PAGES=0``, the tensors are left as they are.
"""

from __future__ import annotations

import math
import mmap
import os
import sys

import torch

HUGE_PAGE = 2 << 20
ALIGN = 4096  # each tensor starts on its own 4 KB page (the GEMM's loads are 64-byte aligned then)
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> bool:
    """Whether this host can back an advised mapping by transparent huge pages (Linux, THP not "never"),
    and ``ETR_CPU_HUGE_PAGES`` is not "0"."""
    if os.environ.get("ETR_CPU_HUGE_PAGES", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(THP_ENABLED) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _offsets(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return offsets, end


def _mapping(nbytes: int) -> torch.Tensor:
    """``nbytes`` of zeros starting on a 2 MB boundary, in an anonymous private mapping advised
    ``MADV_HUGEPAGE`` (uint8; the mapping is freed with the last view of it)."""
    # Whole huge pages, and one of slack: the start is on a 2 MB boundary wherever the mapping landed, and
    # the last huge page lies inside the mapping too.
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so that the faults take huge pages
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping while any view lives
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor in its own huge-page mapping where huge pages are ``supported``, else
    ``torch.empty``. Its pages are zeros until written, and cost no memory until touched (then 2 MB at a
    time)."""
    if not supported():
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return _mapping(nbytes).view(dtype).view(shape)


def together(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the contiguous CPU ``tensors``, one after another in a single huge-page mapping, in the
    given order (a step's read order keeps its stream in one run). The mapping is freed with the last copy.
    Returns ``tensors`` unchanged where huge pages are not ``supported`` or there is nothing to move."""
    if not tensors or not supported():
        return tensors
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"huge_pages.together takes contiguous CPU tensors, got one of shape "
                             f"{tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")
    offsets, size = _offsets(tensors)
    raw = _mapping(size)
    out = []
    for t, offset in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        copy = raw[offset:offset + nbytes].view(t.dtype).view(t.shape)
        copy.copy_(t)
        out.append(copy)
    return out


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of huge pages backing the mapping that holds ``t`` (from /proc/self/smaps; 0 where unknown)."""
    address = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
