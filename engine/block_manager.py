"""KV-cache block accounting: reference counts, block tables, and prefix caching.

A full block is identified by a chained hash of its tokens (the hash of the previous block folded in), so a
block is shared only when the whole prefix before it is the same. Freed blocks keep their hash and
contents until they are handed out again, so a later request with the same prefix can revive them.

A sequence's new block is, where it can be, the one after its last block in the pool (``_take_next``), so that its
pages follow each other in memory: the CPU decode attention reads a sequence's pages in order, and pages in order
read faster than scattered ones (bench/RESULTS.md). The cache still loses its prefixes least recently freed
first: a sequence that grows into a free block holding a newer prefix first moves that prefix into the least
recently freed block (one block copy in every layer, ``copy_block``), whose own prefix was next to go anyway, and
that block takes the other's place in the free list (``FreeList.replace``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from etr.engine.free_list import FreeList
from etr.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    """One KV block: reference count and, when full, its chained content hash."""
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


# A sequence that starts a new run of blocks starts it this many blocks into a free run, which it leaves to the
# sequence whose last block comes before the run, to grow into; it looks for such a run within this many blocks
# after the latest new sequence's entry, then from the pool's start, then among this many least recently freed.
RUN_GAP = 16
RUN_SEARCH = 512


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block's tokens chained to the hash of the block before it."""
    return hash((prev_hash, token_ids))


class BlockManager:
    """Allocates, shares (prefix caching) and frees the KV blocks of sequences."""
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 copy_block: Callable[[int, int], None] | None = None):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # The longest-free block is reused first, so recently freed prefixes survive longest.
        self.free = FreeList(num_blocks)
        self.hash_to_block_id: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        # When each block was last freed, in frees: how old a free block's cached prefix is (see _spare).
        self.freed_at = list(range(num_blocks))
        self.frees = num_blocks
        # Copies a block's KV (src, dst) in every layer; without it a cached prefix is never moved (see
        # _move_aside), and a sequence grows into a block that caches one only when the prefix is old.
        self.copy_block = copy_block
        self.moves = 0  # cached prefixes moved aside so far
        self.last_entry = -1  # where the latest new sequence entered a free run (see _find_entry)
        self.no_room_at = -1  # ``frees`` when _find_entry last found no run with room

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def _take_free(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id = self.free.first()
        self.free.remove(block_id)
        return self._claim(block_id)

    def _claim(self, block_id: int) -> Block:
        block = self.blocks[block_id]
        block.ref_count = 1
        return block

    def _take_next(self, prev: int | None) -> Block:
        """A free block for a sequence whose last block is ``prev`` (None: a new sequence): the block after
        ``prev`` where it can be taken (``_can_take``); else an entry into a free run with room (``_find_entry``);
        else the least recently freed block."""
        if prev is not None and self._can_take(prev + 1):
            return self._take_clear(prev + 1)
        if self.no_room_at != self.frees:  # else one failed and nothing was freed since: it would fail again, mostly
            if (at := self._find_entry()) is not None:
                return self._take_clear(at)
            self.no_room_at = self.frees
        return self._take_free()

    def _find_entry(self) -> int | None:
        """The first free run with room after the latest new sequence's entry, or from the pool's start, or
        among the least recently freed blocks (next fit: new sequences line up, RUN_GAP blocks apart)."""
        at = self._entry_after(self.last_entry)
        if at is None:
            at = self._entry_after(-1)
        if at is None:
            at = self._entry_among_oldest()
        return at

    def _entry_among_oldest(self) -> int | None:
        for b in islice(self.free, RUN_SEARCH):
            if (b == 0 or b - 1 not in self.free) and (at := self._run_entry(b)) is not None:
                return at
        return None

    def _entry_after(self, block_id: int) -> int | None:
        """An entry into the first free run with room among the RUN_SEARCH blocks after ``block_id``."""
        for b in self.free.run_starts(block_id + 1, block_id + 1 + RUN_SEARCH):
            if (at := self._run_entry(b)) is not None:
                return at
        return None

    def _run_entry(self, start: int) -> int | None:
        """Where a new sequence enters the free run that starts at ``start``: RUN_GAP blocks in (at 0 where the
        run begins the pool); None where the run is too short."""
        at = start if start == 0 else start + RUN_GAP
        if not all(self._can_take(i) for i in range(start, at + 1)):
            return None
        self.last_entry = at
        return at

    def _can_take(self, block_id: int) -> bool:
        """Free, and handing it out keeps every prefix the cache would keep: its prefix can move to another block
        (``_move_aside``), or it caches none worth keeping (``_spare``)."""
        return block_id in self.free and (self.copy_block is not None or self._spare(block_id))

    def _spare(self, block_id: int) -> bool:
        """Caching no prefix, or one about to be evicted anyway: freed within the oldest eighth of the free list's
        frees (by ``freed_at``), so that handing it out early barely changes what the cache keeps."""
        block = self.blocks[block_id]
        if block.hash is None or self.hash_to_block_id.get(block.hash) != block_id:
            return True
        oldest = self.freed_at[self.free.first()]
        return self.freed_at[block_id] - oldest <= (self.frees - oldest) // 8

    def _take_clear(self, block_id: int) -> Block:
        if self._spare(block_id):
            return self._take_free(block_id)
        self._move_aside(block_id)
        return self._claim(block_id)

    def _move_aside(self, block_id: int) -> None:
        """Move free block ``block_id``'s cached prefix into the least recently freed block, whose own prefix is
        the one a least-recently-freed policy evicts now, and take ``block_id`` out of the free list: the head takes
        its place there and its stamp, so the cache keeps the prefixes, in the order, that it would have kept."""
        head = self.free.first()  # never block_id: the head is always _spare
        src, dst = self.blocks[block_id], self.blocks[head]
        self._forget_hash(dst)
        self.copy_block(block_id, head)
        self._register(dst, src.hash, src.token_ids)
        src.hash, src.token_ids = None, ()
        self.free.replace(block_id, head)
        self.freed_at[head] = self.freed_at[block_id]
        self.moves += 1

    def _forget_hash(self, block: Block) -> None:
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids = None, ()

    def _register(self, block: Block, h: int, token_ids: tuple[int, ...]) -> None:
        block.hash, block.token_ids = h, token_ids
        if self.enable_prefix_caching:
            self.hash_to_block_id[h] = block.block_id

    def _lookup(self, h: int, token_ids: tuple[int, ...]) -> int | None:
        block_id = self.hash_to_block_id.get(h)
        # Compare tokens too: a hash collision must never serve another prefix's KV.
        if block_id is not None and self.blocks[block_id].token_ids == token_ids:
            return block_id
        return None

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= seq.num_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached full blocks of its prefix."""
        assert not seq.block_table
        # The last token is always recomputed: its logits are what the prefill is for.
        cacheable = (len(seq) - 1) // self.block_size
        h, hits, missed = None, 0, False
        for i in range(seq.num_blocks):
            tokens = tuple(seq.block_tokens(i))
            full = len(tokens) == self.block_size
            h = chain_hash(h, tokens) if full else None
            block_id = None if missed or i >= cacheable or h is None else self._lookup(h, tokens)
            if block_id is None:
                missed = True
                block = self._take_next(seq.block_table[-1] if seq.block_table else None)
                self._forget_hash(block)
                if full:
                    self._register(block, h, tokens)
            else:
                hits += 1
                block = self.blocks[block_id]
                if block_id in self.free:
                    self._take_free(block_id)
                else:
                    block.ref_count += 1
            seq.block_table.append(block.block_id)
        seq.num_cached_tokens = hits * self.block_size

    def deallocate(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks no one holds go back to the free list (tail first)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free.append(block_id)
                self.freed_at[block_id], self.frees = self.frees, self.frees + 1
        seq.block_table.clear()

    def forget_prefixes(self, seqs: list[Sequence]) -> None:
        """The step that was to write these sequences' KV failed: no later request may find their blocks' prefixes
        (which were registered when the blocks were handed out). The blocks keep their hashes, which the
        sequences' next blocks chain from."""
        for seq in seqs:
            for block_id in seq.block_table:
                h = self.blocks[block_id].hash
                if h is not None and self.hash_to_block_id.get(h) == block_id:
                    del self.hash_to_block_id[h]

    def can_append(self, seq: Sequence) -> bool:
        """Whether the token about to be computed for ``seq`` has a slot (a new block is needed at a boundary)."""
        return (len(seq) - 1) % self.block_size != 0 or self.num_free_blocks >= 1

    def may_append(self, seq: Sequence) -> None:
        """Before a decode step: give ``seq`` a new block at a boundary; hash a block the step fills."""
        n = len(seq)
        if (n - 1) % self.block_size == 0:
            block = self._take_next(seq.block_table[-1] if seq.block_table else None)
            self._forget_hash(block)
            seq.block_table.append(block.block_id)
        if n % self.block_size == 0:
            prev = seq.block_table[-2] if len(seq.block_table) > 1 else None
            prev_hash = None if prev is None else self.blocks[prev].hash
            tokens = tuple(seq.block_tokens(seq.num_blocks - 1))
            self._register(self.blocks[seq.block_table[-1]], chain_hash(prev_hash, tokens), tokens)

    def all_free(self) -> bool:
        return self.num_free_blocks == self.num_blocks and all(b.ref_count == 0 for b in self.blocks)
