"""Continuous batching: each step gives every running request its next token and, in the same forward,
prefills waiting requests (new or preempted) within the token budget, so an arrival never stalls the running
decodes; or (``mixed_batches=False``, the CPU's default) a step is either all prefills or all decodes,
prefills first, so an arrival's first token comes sooner. When the KV
pool runs dry, the newest running request is preempted: its blocks are freed and it is recomputed later from
its tokens (prefix caching makes that cheap)."""

from __future__ import annotations

from collections import deque

from etr.engine.block_manager import BlockManager
from etr.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Continuous batching: picks each step's decodes and prefills (or, unmixed, either), preempts when out of
    blocks."""
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 mixed_batches: bool = True):
        self.block_manager = block_manager
        self.mixed_batches = mixed_batches
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], int]:
        """This step's sequences, decodes first, and how many of them decode (the rest prefill)."""
        if not self.mixed_batches:
            prefills = self._schedule_prefills(0)
            return (prefills, 0) if prefills else self._all_decodes()
        preemptions = self.num_preemptions
        decodes, _ = self._all_decodes()
        # Blocks ran short: admitting a prefill now would only preempt it again.
        prefills = self._schedule_prefills(len(decodes)) if self.num_preemptions == preemptions else []
        return decodes + prefills, len(decodes)

    def _all_decodes(self) -> tuple[list[Sequence], int]:
        decodes = self._schedule_decodes()
        return decodes, len(decodes)

    def _schedule_prefills(self, num_tokens: int) -> list[Sequence]:
        scheduled = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # The first prefill always goes (it may pass the budget by the step's decodes): a long prompt must
            # not wait for a step without decodes, which under steady load never comes.
            if scheduled and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            num_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        return scheduled

    def _schedule_decodes(self) -> list[Sequence]:
        scheduled = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished and give its blocks back."""
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)

    def release(self, seq: Sequence) -> None:
        """Hand ``seq`` off to another model: free its blocks here without finishing it."""
        self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        seq.status = SequenceStatus.WAITING

    def holds(self, seq: Sequence) -> bool:
        return seq in self.waiting or seq in self.running

    def abort(self, seq: Sequence) -> None:
        """Remove ``seq`` wherever it is, freeing its blocks (used when a call fails half-way)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
