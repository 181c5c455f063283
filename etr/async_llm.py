"""``AsyncLLM``: the engine as an asyncio service component.

One dedicated thread owns the engines: it alone adds, steps and aborts sequences. Callers (coroutines on any
event loop, in any thread) encode and validate their request themselves, hand it over through an inbox, and
read its outputs from their own ``asyncio.Queue``; the engine thread fills those queues with one
``call_soon_threadsafe`` per event loop per step. So an event loop never waits for model work, and every
request has one owner at a time: its caller until the engine thread takes it from the inbox, then the engine
thread until it finishes or is aborted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from etr.engine import EngineConfig, SamplingParams, StreamDelta
from etr.engine.config import META
from etr.engine.sequence import Sequence
from etr.errors import ConfigError, DuplicateRequestError, EngineDeadError, QueueFullError
from etr.llm import LLM, PreparedRequest, Prompt


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot the engine thread publishes after every step (read it with ``AsyncLLM.stats``)."""
    num_running: int = 0
    num_waiting: int = 0  # in the engines' queues and in the inbox
    kv_blocks_used: dict[str, int] = field(default_factory=dict)   # per model name ("meta", experts)
    kv_blocks_total: dict[str, int] = field(default_factory=dict)
    switches: dict[str, int] = field(default_factory=dict)          # hand-overs per expert (0 too), since start
    generated_tokens: int = 0


@dataclass(slots=True, eq=False)
class _Request:
    request_id: str
    prepared: PreparedRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    seq: Sequence | None = None  # set by the engine thread when it takes the request
    cancelled: bool = False


class RequestStream:
    """The outputs of one submitted request: iterate it (``async for``) for ``StreamDelta`` items; the last
    one has ``finished`` set and carries the whole ``RequestOutput`` (expert, switch_index, metrics).
    ``close()`` (or leaving an ``async for`` over ``AsyncLLM.generate``) aborts a request still running."""

    def __init__(self, owner: AsyncLLM, request: _Request):
        self._owner, self._request, self.finished = owner, request, False

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamDelta:
        if self.finished:
            raise StopAsyncIteration
        item = await self._request.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self._owner._forget(self._request)
        return item

    def close(self) -> None:
        """Abort the request if it has not finished; idempotent."""
        if not self.finished:
            self.finished = True
            self._owner._cancel(self._request)


class AsyncLLM:
    """``LLM`` for asyncio services: concurrent requests share one continuous batch per model.

    ``AsyncLLM(model, **options)`` or ``AsyncLLM(config=EngineConfig(...))`` takes the options of ``LLM``, plus
    ``max_waiting``: how many requests may wait beyond ``max_num_seqs`` running ones before new ones are
    refused with ``QueueFullError`` (never queued forever). Loading happens in the constructor (blocking, as
    ``LLM``). After it no call waits for model work: ``submit`` encodes and validates on the caller's thread
    (a tokenizer call) and hands the request over; ``shutdown`` joins the engine thread (call it in an
    executor from a running loop).

    ``async for out in llm.generate(prompt, params, request_id=None)`` yields ``StreamDelta`` items (new
    token ids, new text; the last one ``finished`` with ``finish_reason`` and the whole output). Leaving the
    loop early, cancelling the consuming task or ``await llm.abort(request_id)`` frees the request's KV
    blocks in whichever model holds it. If the engine loop dies, every waiting caller gets
    ``EngineDeadError`` with the cause, later requests too, and ``check_health()`` raises it.
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, max_waiting: int = 1024,
                 **options):
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ConfigError(f"max_waiting={max_waiting!r} must be an int >= 0")
        self.max_waiting = max_waiting
        self._requests: dict[str, _Request] = {}  # unfinished, by id; guarded by _requests_lock
        self._requests_lock = threading.Lock()
        self._inbox: deque[tuple[str, _Request]] = deque()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._active: dict[Sequence, _Request] = {}  # the engine thread's own
        self._dead: EngineDeadError | None = None
        self._stopping = False
        self._generated = 0
        # The engine is built on the thread that will step it: torch's OpenMP thread team belongs to the thread
        # that first runs parallel work, and another thread's GEMMs then ran 2-3x slower (bench/RESULTS.md).
        built: list = []
        self._thread = threading.Thread(target=self._run, args=(lambda: LLM(model, config=config, **options), built),
                                        name="etr-engine-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        if isinstance(built[0], BaseException):
            raise built[0]
        self.config = self._llm.config

    @property
    def tokenizer(self):
        """The meta's HF tokenizer (None when the checkpoint ships none)."""
        return self._llm.tokenizer

    def chat_prompt_ids(self, conversation: list[dict]) -> list[int]:
        """Token ids of a conversation rendered by the meta's chat template (see ``LLM.chat_prompt_ids``)."""
        return self._llm.chat_prompt_ids(conversation)

    @property
    def stats(self) -> EngineStats:
        """The latest snapshot of queue lengths, KV blocks, switches and tokens."""
        return self._stats

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the engine loop has died (or was shut down)."""
        if self._dead is not None:
            raise fresh(self._dead)

    # ---- the callers' side (any event loop, any thread) -------------------------------------------------

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
               route: str | None = None) -> RequestStream:
        """Validate and queue one request now (errors raise here, before any output); returns its stream.
        Call from a running event loop: outputs arrive on that loop."""
        self.check_health()
        (prepared,) = self._llm.prepare([prompt], params, route)
        rid = uuid.uuid4().hex if request_id is None else str(request_id)
        request = _Request(rid, prepared, asyncio.get_running_loop(), asyncio.Queue())
        with self._requests_lock:
            if rid in self._requests:
                raise DuplicateRequestError(f"request id {rid!r} is already in use by an unfinished request")
            limit = self.config.max_num_seqs + self.max_waiting
            if len(self._requests) >= limit:
                raise QueueFullError(f"{len(self._requests)} requests already queued or running (limit "
                                     f"max_num_seqs + max_waiting = {limit}); request {rid!r} refused")
            self._requests[rid] = request
        self._send("add", request)
        return RequestStream(self, request)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       route: str | None = None) -> AsyncIterator[StreamDelta]:
        """Yield one request's outputs as they are produced (see the class docstring)."""
        stream = self.submit(prompt, params, request_id, route)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.close()

    async def abort(self, request_id: str) -> bool:
        """Abort a request by id: its caller's stream ends with ``finish_reason="abort"``; its KV blocks are
        freed. False when no unfinished request has that id."""
        with self._requests_lock:
            request = self._requests.get(str(request_id))
        if request is None:
            return False
        self._send("abort", request)
        return True

    def shutdown(self) -> None:
        """Stop the engine thread: unfinished requests end with finish_reason "abort", requests not yet taken
        and later ones fail with ``EngineDeadError``; idempotent. Blocks until the thread has stopped (at most
        one engine step): from an event loop, call it in an executor."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=60)

    def _cancel(self, request: _Request) -> None:
        request.cancelled = True
        self._forget(request)
        self._send("abort", request)

    def _forget(self, request: _Request) -> None:
        with self._requests_lock:
            if self._requests.get(request.request_id) is request:
                del self._requests[request.request_id]

    def _send(self, kind: str, request: _Request) -> None:
        self._inbox.append((kind, request))
        self._wake.set()
        if self._dead is not None:  # the loop may have stopped after the health check: fail, never hang
            self._deliver({request.loop: [(request, fresh(self._dead))]})

    # ---- the engine thread --------------------------------------------------------------------------------

    def _run(self, build, built: list) -> None:
        try:
            llm = build()
            self._llm = llm
            self._stats = self._snapshot()
        except BaseException as e:  # noqa: BLE001 (the constructor raises it)
            built.append(e)
            self._ready.set()
            return
        built.append(llm)
        self._ready.set()
        try:
            while True:
                self._wake.clear()
                self._apply_inbox()
                if self._stopping:
                    self._dead = self._dead or EngineDeadError("the engine was shut down")
                    break
                if not self._llm.switcher.has_unfinished():
                    self._wake.wait()
                    continue
                self._step()
        except BaseException as e:  # noqa: BLE001 (every caller is told, then the thread ends)
            self._die(e)
            return
        self._abort_all()
        self._fail_inbox()

    def _apply_inbox(self) -> None:
        if not self._inbox:
            return
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._llm.lock:
            while self._inbox:
                kind, request = self._inbox.popleft()
                if kind == "add" and not request.cancelled and request.seq is None:
                    try:
                        request.seq = self._llm.submit(request.prepared, stream=True)
                    except Exception as e:  # noqa: BLE001 (checked by the caller already; if it still fails, alone)
                        self._forget(request)
                        batches.setdefault(request.loop, []).append((request, e))
                        continue
                    self._active[request.seq] = request
                elif kind == "abort" and request.seq is not None and request.seq in self._active:
                    self._abort(batches, request)
        self._publish(batches)

    def _abort(self, batches: dict, request: _Request) -> None:
        """Free the request wherever it is; its caller (if still there) gets the last output, "abort"."""
        self._llm.switcher.abort([request.seq])
        self._collect(batches, request, request.seq)

    def _step(self) -> None:
        with self._llm.lock:
            progressed = self._llm.switcher.step()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for seq in progressed:
            request = self._active.get(seq)
            if request is not None:
                self._collect(batches, request, seq)
        self._publish(batches)

    def _collect(self, batches: dict, request: _Request, seq: Sequence) -> None:
        delta = self._take(request, seq)
        if delta is not None and not request.cancelled:  # a failed request gets its error instead of an output
            item = fresh(seq.error) if seq.error is not None else delta
            batches.setdefault(request.loop, []).append((request, item))

    def _publish(self, batches: dict) -> None:
        # The snapshot first: a caller that sees its last output also sees the stats that count it.
        self._stats = self._snapshot()
        self._deliver(batches)

    def _take(self, request: _Request, seq: Sequence) -> StreamDelta | None:
        delta = self._llm.engine.take_delta(seq)
        if delta is None:
            return None
        self._generated += len(delta.token_ids)
        if delta.finished:  # the id is free again from here, whether or not its caller reads the last output
            self._active.pop(seq, None)
            self._forget(request)
            output = dataclasses.replace(delta.output, request_id=request.request_id)
            return dataclasses.replace(delta, request_id=request.request_id, output=output)
        return dataclasses.replace(delta, request_id=request.request_id)

    def _deliver(self, batches: dict) -> None:
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is left to read these, so abort them
                for request, _ in items:
                    if not request.cancelled:
                        self._cancel(request)

    def _die(self, cause: BaseException) -> None:
        dead = EngineDeadError(f"the engine loop died: {type(cause).__name__}: {cause}")
        dead.__cause__ = cause
        self._dead = dead
        self._fail(list(self._active.values()) + [r for kind, r in list(self._inbox) if kind == "add"])

    def _fail_inbox(self) -> None:
        self._fail([r for kind, r in list(self._inbox) if kind == "add" and r.seq is None])

    def _fail(self, requests: list[_Request]) -> None:
        batches: dict = {}
        for request in requests:
            self._forget(request)
            batches.setdefault(request.loop, []).append((request, fresh(self._dead)))
        self._deliver(batches)

    def _abort_all(self) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._llm.lock:
            for request in list(self._active.values()):
                self._abort(batches, request)
        self._publish(batches)

    def _snapshot(self) -> EngineStats:
        switcher = self._llm.switcher
        models = {META: switcher.meta, **switcher.experts}
        return EngineStats(
            num_running=sum(e.num_running() for e in switcher.engines),
            num_waiting=sum(e.num_waiting() for e in switcher.engines) + sum(k == "add" for k, _ in list(self._inbox)),
            kv_blocks_used={n: e.kv_blocks_used() for n, e in models.items()},
            kv_blocks_total={n: e.num_kv_blocks() for n, e in models.items()},
            switches={name: switcher.switches[name] for name in switcher.experts}, generated_tokens=self._generated)


def fresh(error: BaseException) -> BaseException:
    """A new exception like ``error`` (same type, message and cause): one instance raised in many places, or
    again and again, would pile up tracebacks on itself across threads."""
    copy = type(error)(str(error))
    copy.__cause__ = error.__cause__
    return copy


def _put_all(items) -> None:
    for request, item in items:
        request.queue.put_nowait(item)
