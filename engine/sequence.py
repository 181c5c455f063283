"""A request as the scheduler and runner see it: its tokens, its KV blocks, its state."""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto

import torch

from etr.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    """Where a sequence is in its life."""
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: prompt and output ids, its block table, sampling state and metrics."""
    _ids = itertools.count()

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, block_size: int,
                 device: torch.device | str = "cpu", prompt: str | None = None):
        self.seq_id = next(Sequence._ids)
        self.prompt = prompt
        self.status = SequenceStatus.WAITING
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.block_size = block_size
        self.block_table: list[int] = []
        self.num_cached_tokens = 0   # prefix-cache hit length at the latest admission
        self.finish_reason: str | None = None
        self.generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        self.num_preemptions = 0
        self.text = ""            # detokenized output, kept current only when stop strings or streaming need it
        self.stream = False       # someone reads this sequence's output as it grows (keep ``text`` current)
        self.num_streamed_chars = 0
        self.num_streamed_tokens = 0
        self.stop_string_hit = False
        self.pending_expert: int | None = None  # expert row the meta just chose, until the switcher moves it
        self.expert: str | None = None
        self.switch_index: int | None = None
        self.switch_prefill_s: float | None = None
        self.switch_network_s: float | None = None  # a remote expert's hand-off, network and serialization
        self.error: Exception | None = None  # why the sequence failed (finish_reason "error"), e.g. its expert died
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
