"""A model's packed CPU weights (and, on request, a CPU KV pool) on transparent huge pages.

Unless the process was started with ``THP_MEM_ALLOC_ENABLE=1`` or the host's THP setting is "always", torch
puts a tensor on the host's 4 KB pages. A batch-1 decode step then crosses every page of its ~270 MB of weights
once: ~66,000 pages, far more than the TLB holds, each new one a page walk. So ``move`` copies the weights into
one anonymous private mapping, advised ``MADV_HUGEPAGE`` before anything touches it. The weights then sit on
huge pages, in the order a step reads them: faster decode steps at batch 1-16 on this project's Zen 5 machine
(bench/RESULTS.md, ``bench/knob_ab.py --knob huge_pages``).

``empty`` allocates the same way. The engine uses it for a CPU KV pool only when ``ETR_CPU_HUGE_KV=1``
(engine/kv_cache.py), since a pool on huge pages takes memory 2 MB at a time as sequences first touch it, and
the kernel may compact memory inside a step to find them; it paid only at batch 16 and long contexts
(``--knob huge_kv``).

The bits are unchanged, and so is every shape and stride. Where the kernel has no transparent huge pages
(``supported``), where ``ETR_CPU_HUGE_PAGES=0``, or where the mapping cannot be made (a warning says why), the
tensors stay on torch's pages.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import sys
import warnings

import torch

ALIGN = 4096  # each tensor starts on its own 4 KB page (the GEMM's loads are 64-byte aligned then)
THP = "/sys/kernel/mm/transparent_hugepage"


@functools.cache
def huge_page_size() -> int:
    """Bytes of a transparent huge page here (2 MB on x86-64; the kernel says where it says)."""
    try:
        with open(f"{THP}/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


def supported() -> bool:
    """Whether this host can back an advised mapping by transparent huge pages (Linux, THP not "never"),
    and ``ETR_CPU_HUGE_PAGES`` is not "0"."""
    if os.environ.get("ETR_CPU_HUGE_PAGES", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(f"{THP}/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _mapping(nbytes: int) -> torch.Tensor:
    """``nbytes`` of zeros starting on a huge-page boundary, in an anonymous private mapping advised
    ``MADV_HUGEPAGE`` (uint8; the mapping is freed with the last view of it). Raises ``OSError``."""
    page = huge_page_size()
    # Whole huge pages, and one of slack: the start is on a boundary wherever the mapping landed, and the last
    # huge page lies inside the mapping too.
    size = -(-nbytes // page) * page
    region = mmap.mmap(-1, size + page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so that the faults take huge pages
    except OSError as e:  # advice only: a sandbox may refuse it, and the mapping still works
        warnings.warn(f"madvise(MADV_HUGEPAGE) refused ({e}); the tensors stay on 4 KB pages", stacklevel=3)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping while any view lives
    start = -raw.data_ptr() % page
    return raw[start:start + nbytes]


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor in its own huge-page mapping where huge pages are ``supported``, else (or where
    the mapping cannot be made) ``torch.empty``. Its pages are zeros until written, and cost no memory until
    touched, then a huge page at a time."""
    if supported():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        try:
            return _mapping(nbytes).view(dtype).view(shape)
        except OSError as e:
            warnings.warn(f"no huge-page mapping of {nbytes} bytes ({e}); torch's pages instead", stacklevel=2)
    return torch.empty(shape, dtype=dtype)


def move(owners: list, attr: str) -> bool:
    """Move tensor ``getattr(o, attr)`` of every owner into one huge-page mapping, one after another in the
    given order (a step's read order keeps its stream in one run), each set back on its owner as soon as it is
    copied: while they move, the memory taken is the mapping's and that of the tensors not yet moved (whose
    memory is freed as they go, where nothing else holds them). Returns whether they moved: False where huge
    pages are not ``supported``, there is nothing to move, or the mapping cannot be made (a warning says why).
    The tensors must be contiguous CPU tensors."""
    if not owners or not supported():
        return False
    sizes = []
    for o in owners:
        t = getattr(o, attr)
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"huge_pages.move takes contiguous CPU tensors, got {attr} of shape {tuple(t.shape)} "
                             f"on {t.device} (contiguous={t.is_contiguous()})")
        sizes.append(-(-t.numel() * t.element_size() // ALIGN) * ALIGN)
    try:
        raw = _mapping(sum(sizes))
    except OSError as e:
        warnings.warn(f"no huge-page mapping of {sum(sizes)} bytes ({e}); the tensors stay on torch's pages",
                      stacklevel=2)
        return False
    offset = 0
    for o, size in zip(owners, sizes):
        t = getattr(o, attr)
        copy = raw[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        copy.copy_(t)
        setattr(o, attr, copy)
        offset += size
    return True


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of huge pages in the memory region (``/proc/self/smaps``; adjacent mappings alike in every respect
    may form one) that holds ``t``'s first byte; 0 where unknown."""
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
