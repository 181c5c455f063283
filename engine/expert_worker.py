"""The expert's side of a remote expert: its engine and KV pool, stepped by a loop of its own inside a Ray
actor (``engine/remote_expert.py`` is the switcher's side).

A handed-over sequence crosses the network once, as token ids, sampling parameters and the seeded
generator's state (``HandOver``). The worker's own thread then decodes it with every other sequence it holds,
and after each step sends what the step produced, for all its sequences in one frame (``Progress``), over the
channel (``engine/expert_channel.py``): one message per engine step, never one per token per request, and the
worker never waits for the switcher to collect it. Ray calls only start the channel (``open_channel``),
describe the engine (``info``) and report its counts (``stats``). Nothing here imports Ray at module level:
the actor is ``ray.remote(ExpertWorker)``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from etr.engine.config import EngineConfig
from etr.engine.expert_channel import Channel, ChannelClosed, Listener
from etr.engine.kv_cache import size_kv_pools
from etr.engine.llm_engine import LLMEngine
from etr.engine.sampling_params import SamplingParams
from etr.engine.sequence import Sequence

HEARTBEAT_S = 0.5  # while it holds sequences the worker sends at least this often: silence means trouble


@dataclass(slots=True)
class HandOver:
    """Everything a sequence needs to continue on the expert: what crosses the network once per switch."""
    seq_id: int
    token_ids: list[int]          # prompt and output so far
    num_prompt_tokens: int
    params: SamplingParams
    generator_state: bytes | None  # the seeded sampler's torch.Generator state, so sampling continues exactly
    generator_device: str          # "cpu" or "cuda": where that generator draws (a state fits only its kind)
    stream: bool                   # keep the text current (streamed requests)
    expert: str
    switch_index: int
    text: str = ""                 # the text so far, where tracked (a stop string is searched only in new text)


@dataclass(slots=True)
class Progress:
    """What one sequence produced since the previous message."""
    seq_id: int
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    text: str | None = None        # streamed or finished sequences: the text from ``text_from`` on (what changed)
    text_from: int = 0
    prefill_s: float | None = None  # once, after the hand-over: the expert's prefill of the shared context
    error: str | None = None       # why the expert could not take the sequence (finish_reason "error")
    held_s: float | None = None    # once, after the hand-over: from its arrival to this frame's sending


def vocab_fingerprint(tokenizer) -> str | None:
    """A digest of a tokenizer's vocabulary and special tokens (None without a tokenizer): two models may
    exchange token ids only when theirs are equal."""
    if tokenizer is None:
        return None
    text = repr((sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ExpertWorker:
    """One expert checkpoint's engine with its loop, fed and heard through its channel (``open_channel``)."""

    def __init__(self, config: EngineConfig, model_dir: str, device: str, tokenizer_dir: str | None = None,
                 num_threads: int | None = None):
        self.seqs: dict[int, Sequence] = {}  # by the switcher's sequence id
        self.ids: dict[Sequence, int] = {}   # and back
        self.inbox: deque[tuple[list[HandOver], list[int], float]] = deque()  # with the time each arrived
        self.frames_applied = 0    # frames from the switcher the engine thread has applied
        self.outbox: dict[int, Progress] = {}
        self.arrived: dict[int, float] = {}  # hand-overs whose first progress is not sent yet: when they arrived
        self.texts: dict[int, str] = {}      # the text the switcher has of each sequence (only changes are sent)
        self.prefill_reported: set[int] = set()
        self.cond = threading.Condition()
        self.failure: BaseException | None = None
        self.channel: Channel | None = None
        self.last_sent = time.monotonic()
        # Built on the thread that steps it (see etr/async_llm.py: torch's OpenMP team belongs to one thread).
        built: list = []
        thread = threading.Thread(target=self._run, args=(config, model_dir, device, tokenizer_dir, num_threads, built),
                                  name="etr-expert-worker", daemon=True)
        thread.start()
        with self.cond:
            self.cond.wait_for(lambda: built)
        if isinstance(built[0], BaseException):
            raise built[0]

    def _build(self, config, model_dir, device, tokenizer_dir, num_threads) -> LLMEngine:
        if num_threads:
            torch.set_num_threads(num_threads)
        engine = LLMEngine(config, model_dir, torch.device(device))
        engine.label = "expert"  # in a profile of the actor's process
        if engine.tokenizer is None and tokenizer_dir is not None:  # the same ids: the meta's writes the text
            from etr.models.tokenizer import load_tokenizer
            engine.tokenizer = engine.stop_checker.tokenizer = load_tokenizer(tokenizer_dir)
        if engine.block_manager is None:
            size_kv_pools([engine])
        return engine

    def info(self) -> dict:
        """What the switcher checks and validates against."""
        import ray
        cfg, engine = self.engine.model_config, self.engine
        return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "block_size": engine.block_size,
                "num_kv_blocks": engine.num_kv_blocks(), "max_model_len": engine.config.max_model_len,
                "vocab_fingerprint": vocab_fingerprint(engine.tokenizer), "device": str(engine.device),
                "node_id": ray.get_runtime_context().get_node_id()}

    def open_channel(self, timeout_s: float) -> tuple[str, int, bytes]:
        """Listen on this node's address for the switcher (``timeout_s`` to connect) and return where, with the
        secret it must show."""
        import ray
        listener = Listener(ray.util.get_node_ip_address())
        threading.Thread(target=self._receive, args=(listener, timeout_s), name="etr-expert-channel",
                         daemon=True).start()
        return listener.host, listener.port, listener.secret

    def stats(self, frames_sent: int) -> dict:
        """Counts once the first ``frames_sent`` frames of the switcher are applied (hand-overs adopted, aborts
        freed): counts that reflect every abort sent before."""
        with self.cond:
            self.cond.wait_for(lambda: self.frames_applied >= frames_sent or self.failure is not None, timeout=30)
        return self._counts()

    def _receive(self, listener: Listener, timeout_s: float) -> None:
        """The channel's reading thread: each frame of hand-overs and aborts goes to the engine thread's inbox.
        When the switcher is gone, so are its sequences: all are aborted (``None``: every sequence held once the
        frames before are applied) and their blocks freed."""
        try:
            self.channel = listener.accept(timeout_s, send_timeout=timeout_s)
            while True:
                frames = self.channel.receive(60.0)
                now = time.perf_counter()
                with self.cond:
                    self.inbox.extend((handovers, aborts, now) for handovers, aborts in frames)
                    self.cond.notify_all()
        except Exception as e:  # noqa: BLE001 (closed or unreadable: the switcher, if still there, fails this expert)
            self._send({"failure": f"the actor stopped reading the switcher's frames: {type(e).__name__}: {e}"})
            with self.cond:
                self.inbox.append(([], None, time.perf_counter()))
                self.cond.notify_all()
            if self.channel is not None:
                self.channel.close()

    def _counts(self) -> dict:
        engine = self.engine
        return {"kv_blocks_used": engine.kv_blocks_used(), "num_running": engine.num_running(),
                "num_waiting": engine.num_waiting()}

    def _run(self, config, model_dir, device, tokenizer_dir, num_threads, built: list) -> None:
        try:
            self.engine = self._build(config, model_dir, device, tokenizer_dir, num_threads)
        except BaseException as e:  # noqa: BLE001 (the constructor raises it)
            built.append(e)
        else:
            built.append(self.engine)
        with self.cond:
            self.cond.notify_all()
        if isinstance(built[0], BaseException):
            return
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.inbox or self.engine.has_unfinished(), timeout=HEARTBEAT_S)
                    while self.inbox:
                        self._apply(*self.inbox.popleft())
                        self.frames_applied += 1
                    self.cond.notify_all()  # stats() waits for its frames to be applied
                if self.engine.has_unfinished():
                    progressed = self.engine.step()
                    with self.cond:
                        for seq in progressed:
                            self._record(seq)
                self._flush()
        except BaseException as e:  # noqa: BLE001 (sent to the switcher, which fails this expert's requests)
            with self.cond:
                self.failure = e
                self.cond.notify_all()
            self._send({"failure": f"the expert's engine loop died: {type(e).__name__}: {e}"})

    def _flush(self) -> None:
        """Send what the last step produced (and hand-overs that failed), or, while sequences are held, a sign
        of life at least every ``HEARTBEAT_S``."""
        now = time.perf_counter()
        with self.cond:
            progress, self.outbox = list(self.outbox.values()), {}
            for p in progress:
                arrived = self.arrived.pop(p.seq_id, None)
                if arrived is not None:
                    p.held_s = now - arrived
                if p.text is not None:
                    self._text_change(p)
            quiet = bool(self.seqs) and time.monotonic() - self.last_sent > HEARTBEAT_S
            counts = self._counts()
        if progress or quiet:
            self._send({"progress": progress, **counts})

    def _text_change(self, p: Progress) -> None:
        """Cut ``p.text`` (the whole text) to what changed since the last one sent: a long streamed answer
        must not cost its whole text every step. Detokenizing can rewrite a last partial character, hence
        the common prefix rather than the length."""
        before, text = self.texts.get(p.seq_id, ""), p.text
        same = len(before) if text.startswith(before) else next(
            (i for i, (x, y) in enumerate(zip(before, text)) if x != y), min(len(before), len(text)))
        p.text, p.text_from = text[same:], same
        if p.finished:
            self.texts.pop(p.seq_id, None)
        else:
            self.texts[p.seq_id] = text

    def _send(self, message: dict) -> None:
        if self.channel is None:
            return
        try:
            self.channel.send(message)
        except ChannelClosed:  # the switcher is gone: the reading thread aborts its sequences
            return
        self.last_sent = time.monotonic()

    def _apply(self, handovers: list[HandOver], aborts: list[int] | None, arrived: float) -> None:
        for h in handovers:
            self.arrived[h.seq_id] = arrived
            try:
                seq = self._sequence(h)
                self.engine.adopt(seq)
            except Exception as e:  # noqa: BLE001 (this sequence fails alone; the loop and the others go on)
                self.outbox[h.seq_id] = Progress(h.seq_id, [], True, "error", error=f"{type(e).__name__}: {e}")
                continue
            self.seqs[h.seq_id], self.ids[seq] = seq, h.seq_id
            self.texts[h.seq_id] = h.text
        for seq_id in list(self.seqs) if aborts is None else aborts:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self.engine.abort([seq])
                del self.ids[seq]
                self.prefill_reported.discard(seq_id)
            self.outbox.pop(seq_id, None)
            self.arrived.pop(seq_id, None)
            self.texts.pop(seq_id, None)

    def _sequence(self, h: HandOver) -> Sequence:
        seq = Sequence(h.token_ids, h.params, self.engine.block_size, self.engine.device)
        seq.num_prompt_tokens, seq.stream, seq.text = h.num_prompt_tokens, h.stream, h.text
        seq.num_streamed_tokens = seq.num_output_tokens
        seq.expert, seq.switch_index = h.expert, h.switch_index
        if h.generator_state is not None:  # else: seeded afresh from params.seed on this expert's device
            kind = h.generator_device if h.generator_device == "cpu" else self.engine.device.type
            seq.generator = torch.Generator(kind if kind == "cpu" else self.engine.device)
            seq.generator.set_state(torch.frombuffer(bytearray(h.generator_state), dtype=torch.uint8))
        return seq

    def _record(self, seq: Sequence) -> None:
        seq_id = self.ids.get(seq)
        if seq_id is None:  # aborted while its step ran
            return
        new = seq.output_token_ids[seq.num_streamed_tokens:]
        seq.num_streamed_tokens += len(new)
        p = self.outbox.setdefault(seq_id, Progress(seq_id, []))
        p.token_ids += new
        p.finished, p.finish_reason = seq.is_finished, seq.finish_reason
        if seq.stream or seq.is_finished:
            p.text = seq.text
        if seq.switch_prefill_s is not None and seq_id not in self.prefill_reported:
            p.prefill_s = seq.switch_prefill_s
            self.prefill_reported.add(seq_id)
        if seq.is_finished:
            del self.seqs[seq_id], self.ids[seq]
            self.prefill_reported.discard(seq_id)
