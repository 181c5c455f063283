"""The generation loop of one model: admit requests, schedule, run, sample, stop, free."""

from __future__ import annotations

import time
import torch

from etr.engine.block_manager import BlockManager
from etr.engine.config import EngineConfig
from etr.engine.model_runner import ModelRunner
from etr.engine.outputs import RequestMetrics, RequestOutput, StreamDelta
from etr.engine.pending_step import PendingStep
from etr.engine.phases import phase, step_kind
from etr.engine.sampler import Sampler
from etr.engine.sampling_params import SamplingParams
from etr.engine.scheduler import Scheduler
from etr.engine.sequence import Sequence
from etr.engine.stop_checker import StopChecker
from etr.errors import InvalidPromptError, InvalidSamplingParamsError, PromptTooLongError
from etr.models.tokenizer import load_tokenizer


def check_prompt(prompt_token_ids: list[int], params: SamplingParams, vocab: int, max_model_len: int,
                 block_size: int, num_blocks: int) -> None:
    """Raise ``InvalidPromptError``/``PromptTooLongError`` if a model with these limits cannot serve the request."""
    n, limit = len(prompt_token_ids), max_model_len
    if n == 0:
        raise InvalidPromptError("empty prompt: give at least one token")
    bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise InvalidPromptError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    bad = [t for t in params.stop_token_ids if t >= vocab]
    if bad:
        raise InvalidSamplingParamsError(f"stop_token_ids {bad[:5]} outside the vocabulary [0, {vocab})")
    if n >= limit:
        raise PromptTooLongError(f"prompt of {n} tokens does not fit max_model_len={limit} "
                                 f"(prompt plus at least one new token must fit)")
    blocks = -(-min(n + params.max_tokens, limit) // block_size)
    if blocks > num_blocks:
        raise PromptTooLongError(f"prompt of {n} tokens with max_tokens={params.max_tokens} needs {blocks} "
                                 f"KV blocks; the pool has {num_blocks}")


class LLMEngine:
    """One model's generation loop: admit, schedule, run, sample, stop, free."""
    remote = False  # the engine runs here (see engine/remote_expert.py for one in a Ray actor)
    def __init__(self, config: EngineConfig, model: str | None = None, device: torch.device | None = None):
        """``model``/``device``: this engine's checkpoint and device (default: the config's meta and device)."""
        self.config = config
        self.model_dir = str(model or config.model)
        self.runner = ModelRunner(config, self.model_dir, config.device if device is None else device)
        self.device, self.block_size = self.runner.device, self.runner.block_size
        self.model_config = self.runner.config
        self.tokenizer = load_tokenizer(self.model_dir)
        self.block_manager: BlockManager | None = None  # with the scheduler, created by init_kv
        self.scheduler: Scheduler | None = None
        if config.num_kv_blocks is not None:
            self.init_kv(config.num_kv_blocks)
        eos = self.model_config.eos_token_ids
        self.sampler = Sampler(eos, self.device)
        self.stop_checker = StopChecker(eos, config.max_model_len, self.tokenizer)
        self.switched: list[Sequence] = []  # sequences that chose an expert token this step
        self.label = "meta"  # in profiler spans; the switcher labels each expert's engine after its expert

    def init_kv(self, num_blocks: int) -> None:
        """Allocate the KV pool and the block accounting over it (see ``kv_cache.size_kv_pools``)."""
        cfg = self.config
        self.runner.allocate_kv(num_blocks)
        self.block_manager = BlockManager(num_blocks, self.block_size, cfg.enable_prefix_caching,
                                          copy_block=self.runner.copy_block)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs,
                                   max(cfg.max_num_batched_tokens, cfg.max_model_len),
                                   cfg.mixed_batches_for(self.device))

    def adopt(self, seq: Sequence) -> None:
        """Continue a sequence another model started (its prompt and output so far become this model's
        context; ``num_prompt_tokens`` is unchanged, so ``max_tokens`` and stops count the whole output)."""
        if len(seq) >= self.config.max_model_len:
            raise PromptTooLongError(f"context of {len(seq)} tokens does not fit max_model_len="
                                     f"{self.config.max_model_len} of {self.model_dir}")
        seq.block_size = self.block_size
        self.scheduler.add(seq)

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise before anything is allocated if the request cannot be served."""
        check_prompt(prompt_token_ids, params, self.model_config.vocab_size, self.config.max_model_len,
                     self.block_size, self.block_manager.num_blocks)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> Sequence:
        """Queue a request (validated first: see ``validate_prompt``); returns its sequence."""
        self.validate_prompt(prompt_token_ids, params)
        seq = Sequence(prompt_token_ids, params, self.block_size, self.device, prompt)
        self.scheduler.add(seq)
        return seq

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one scheduled batch; returns the sequences that received a token."""
        pending = self.launch()
        return [] if pending is None else self.finish(pending)

    @torch.inference_mode()
    def launch(self) -> PendingStep | None:
        """Schedule a batch and start its forward and sampling on the model's device and stream; None when
        nothing is scheduled. Nothing else may touch this engine until ``finish`` takes the result."""
        with phase(f"{self.label} schedule"):
            seqs, num_decodes = self.scheduler.schedule()
        if not seqs:
            return None
        try:
            return self._launch(seqs, num_decodes)
        except BaseException:
            self.block_manager.forget_prefixes(seqs)  # their KV may be half-written
            raise

    def _launch(self, seqs: list[Sequence], num_decodes: int) -> PendingStep:
        runner, start = self.runner, time.perf_counter()
        with runner.stream.active(), phase(f"{self.label} step"):
            started = runner.stream.event()
            greedy = runner.greedy_kernel and all(s.params.greedy and s.num_output_tokens >= s.params.min_tokens
                                                  for s in seqs)
            with phase(f"{self.label} {step_kind(len(seqs), num_decodes)}"):
                out = (runner.run_greedy if greedy else runner.run)(seqs, num_decodes)
            if greedy:
                tokens = out
            else:
                with phase("sampling"):
                    tokens = self.sampler(out, seqs)
            host, ready = runner.stream.to_host(tokens)
        return PendingStep(seqs, num_decodes, host, ready, started, time.perf_counter() - start)

    def finish(self, pending: PendingStep) -> list[Sequence]:
        """Wait for a launched step's tokens and append them (stops, switches, finished requests)."""
        try:
            tokens = pending.wait()
        except BaseException:
            self.block_manager.forget_prefixes(pending.seqs)
            raise
        now = time.perf_counter()
        with phase(f"{self.label} append"):
            for i, (seq, token) in enumerate(zip(pending.seqs, tokens)):
                # In a mixed step this is the whole step's time: the expert's other requests' decodes included.
                if i >= pending.num_decodes and seq.expert is not None and seq.switch_prefill_s is None:
                    seq.switch_prefill_s = pending.seconds()
                self._append(seq, token, now)
        return pending.seqs

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        vocab = self.model_config.vocab_size
        if token >= vocab:
            # An expert token: never part of the context, the output or max_tokens. Hand the sequence over.
            self.scheduler.release(seq)
            seq.pending_expert = token - vocab
            self.switched.append(seq)
            return
        seq.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason = self.stop_checker.check(seq)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            seq.text = self.stop_checker.final_text(seq)
            seq.finish_time = now

    def has_unfinished(self) -> bool:
        """Whether this model still holds a waiting or running sequence."""
        return self.scheduler.has_unfinished()

    def check_available(self) -> None:
        """Raise if this model cannot take requests (an in-process engine always can)."""

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    def kv_blocks_used(self) -> int:
        """Blocks held by sequences (freed prefix-cache blocks count as free)."""
        return self.block_manager.num_blocks - self.block_manager.num_free_blocks

    def all_free(self) -> bool:
        """Whether the KV pool is back to all free (no block leaked)."""
        return self.block_manager.all_free()

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop the unfinished sequences this engine holds, freeing their blocks."""
        for seq in seqs:
            if not seq.is_finished and self.scheduler.holds(seq):
                self.scheduler.abort(seq)
        self.switched = [s for s in self.switched if s not in seqs]

    def take_delta(self, seq: Sequence) -> StreamDelta | None:
        """What ``seq`` produced since the previous call: its new token ids and the text that can no longer
        change (None when there is neither). The last delta (``finished``) carries the whole output, and
        every delta's text joined is the final text. Needs ``seq.stream`` set before its first token."""
        new_ids = seq.output_token_ids[seq.num_streamed_tokens:]
        seq.num_streamed_tokens += len(new_ids)
        if seq.is_finished:
            text, seq.num_streamed_chars = seq.text[seq.num_streamed_chars:], len(seq.text)
            return StreamDelta(seq.seq_id, new_ids, text, True, seq.finish_reason, self.output_of(seq))
        # Hold back a trailing partial character and anything a stop string could still cut off.
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        safe = len(seq.text.rstrip("\ufffd")) - hold
        text = seq.text[seq.num_streamed_chars:max(safe, seq.num_streamed_chars)]
        seq.num_streamed_chars += len(text)
        return StreamDelta(seq.seq_id, new_ids, text) if new_ids or text else None

    def output_of(self, seq: Sequence) -> RequestOutput:
        """The user-facing result of ``seq`` (token ids, text, finish reason, timings, expert used)."""
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time,
                                 seq.num_cached_tokens, seq.num_preemptions, seq.switch_prefill_s or 0.0,
                                 seq.switch_network_s or 0.0)
        return RequestOutput(seq.seq_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens], seq.output_token_ids,
                             seq.text, seq.finish_reason, metrics, seq.expert, seq.switch_index)
