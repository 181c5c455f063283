"""The free KV blocks, least recently freed first: a doubly linked list over block ids.

Besides appending freed blocks and taking any block out, the block manager needs to put one block in another's
place (a cached prefix moved to another block keeps its place in the eviction order), which a dict's insertion
order cannot do. Every operation is O(1) except iteration. ``is_free`` holds a byte a block (1: free), so that
``run_starts`` finds free runs at C speed.
"""

from __future__ import annotations

from collections.abc import Iterator

NONE = -1


class FreeList:
    """Block ids ``0..n-1``, all free at first in id order; ``first()`` is the least recently freed."""
    __slots__ = ("prev", "next", "is_free", "head", "tail", "size")

    def __init__(self, n: int):
        self.prev = list(range(-1, n - 1))
        self.next = [*range(1, n), NONE] if n else []
        self.is_free = bytearray(b"\x01") * n
        self.head, self.tail, self.size = (0, n - 1, n) if n else (NONE, NONE, 0)

    def __len__(self) -> int:
        return self.size

    def __contains__(self, block_id: int) -> bool:
        return 0 <= block_id < len(self.is_free) and self.is_free[block_id]

    def __iter__(self) -> Iterator[int]:
        """Least recently freed first; the caller may take out the block just yielded, and nothing else."""
        b = self.head
        while b != NONE:
            nxt = self.next[b]  # read first: the caller may take b out
            yield b
            b = nxt

    def run_starts(self, lo: int, hi: int) -> Iterator[int]:
        """The free blocks in ``[lo, hi)`` that start a free run (block 0, or one after a block in use), in id
        order. The flags are read as the generator goes: the caller may take blocks in the meantime (taking the
        block just yielded makes the next one a run start, and it is yielded)."""
        flags = self.is_free
        lo, hi = max(lo, 0), min(hi, len(flags))
        if lo >= hi:
            return
        if lo == 0 and flags[0]:
            yield 0
        i = flags.find(b"\x00\x01", max(lo - 1, 0), hi)  # block i in use, i + 1 free: i + 1 starts a run
        while i != -1:
            yield i + 1
            i = flags.find(b"\x00\x01", i + 1, hi)

    def first(self) -> int:
        if self.head == NONE:
            raise IndexError("no free block")
        return self.head

    def remove(self, block_id: int) -> None:
        if not self.is_free[block_id]:
            raise KeyError(f"block {block_id} is not free")
        p, n = self.prev[block_id], self.next[block_id]
        self._link(p, n)
        self.is_free[block_id] = False
        self.size -= 1

    def append(self, block_id: int) -> None:
        """Free ``block_id`` as the most recently freed."""
        if self.is_free[block_id]:
            raise KeyError(f"block {block_id} is already free")
        self._link(self.tail, block_id)
        self._link(block_id, NONE)
        self.is_free[block_id] = True
        self.size += 1

    def replace(self, old: int, new: int) -> None:
        """Take free ``old`` out and put free ``new`` in its place (``new`` leaves its own)."""
        if old == new or not self.is_free[old]:
            raise KeyError(f"cannot put block {new} in the place of block {old}: not a different free block")
        self.remove(new)
        p, n = self.prev[old], self.next[old]
        self._link(p, new)
        self._link(new, n)
        self.is_free[old], self.is_free[new] = False, True

    def _link(self, a: int, b: int) -> None:
        if a == NONE:
            self.head = b
        else:
            self.next[a] = b
        if b == NONE:
            self.tail = a
        else:
            self.prev[b] = a
