"""KV-cache block accounting: reference counts, block tables, and prefix caching.

A full block is identified by a chained hash of its tokens (the hash of the previous block folded in), so a
block is shared only when the whole prefix before it is the same. Freed blocks keep their hash and
contents until they are handed out again, so a later request with the same prefix can revive them.
"""

from __future__ import annotations

from dataclasses import dataclass

from etr.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    """One KV block: reference count and, when full, its chained content hash."""
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block's tokens chained to the hash of the block before it."""
    return hash((prev_hash, token_ids))


class BlockManager:
    """Allocates, shares (prefix caching) and frees the KV blocks of sequences."""
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered: the longest-free block is reused first, so recently freed prefixes survive longest.
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        block.ref_count = 1
        return block

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
                block = self._take_free()
                self._forget_hash(block)
                if full:
                    self._register(block, h, tokens)
            else:
                hits += 1
                block = self.blocks[block_id]
                if block_id in self.free_block_ids:
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
                self.free_block_ids[block_id] = None
        seq.block_table.clear()

    def can_append(self, seq: Sequence) -> bool:
        """Whether the token about to be computed for ``seq`` has a slot (a new block is needed at a boundary)."""
        return (len(seq) - 1) % self.block_size != 0 or self.num_free_blocks >= 1

    def may_append(self, seq: Sequence) -> None:
        """Before a decode step: give ``seq`` a new block at a boundary; hash a block the step fills."""
        n = len(seq)
        if (n - 1) % self.block_size == 0:
            block = self._take_free()
            self._forget_hash(block)
            seq.block_table.append(block.block_id)
        if n % self.block_size == 0:
            prev = seq.block_table[-2] if len(seq.block_table) > 1 else None
            prev_hash = None if prev is None else self.blocks[prev].hash
            tokens = tuple(seq.block_tokens(seq.num_blocks - 1))
            self._register(self.blocks[seq.block_table[-1]], chain_hash(prev_hash, tokens), tokens)

    def all_free(self) -> bool:
        return self.num_free_blocks == self.num_blocks and all(b.ref_count == 0 for b in self.blocks)
