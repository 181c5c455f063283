"""A model's packed CPU weights in one mapping on transparent huge pages.

torch allocates a tensor on the host's 4 KB pages unless the process was started with
``THP_MEM_ALLOC_ENABLE=1``. A batch-1 decode step then crosses every page of its ~270 MB of weights once:
~66,000 pages, far more than the TLB holds. Each new page needs a page walk, and the hardware
prefetchers stop at the page's edge. So ``together`` copies the weights into one anonymous private mapping,
advised ``MADV_HUGEPAGE`` before anything touches it. In the order a step reads them, the weights then sit on
2 MB pages, one stream after the other. That made a batch-1 step ~3-5 % faster (bench/RESULTS.md,
``bench/knob_ab.py --knob huge_pages``).

The bits are unchanged, and so is every shape and stride. Where the kernel has no transparent huge pages
(``supported``), or where ``ETR_CPU_HUGE_PAGES=0``, the tensors are left as they are.
"""

from __future__ import annotations

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
    # Whole huge pages, and one of slack: the first tensor starts on a 2 MB boundary wherever the mapping
    # landed, and the last huge page lies inside the mapping too.
    size = -(-size // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so that the faults take huge pages
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping while any view lives
    start = -raw.data_ptr() % HUGE_PAGE
    out = []
    for t, offset in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        copy = raw[start + offset:start + offset + nbytes].view(t.dtype).view(t.shape)
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
