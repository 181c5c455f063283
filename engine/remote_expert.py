"""The switcher's side of an expert in a Ray actor: it stands where a local ``LLMEngine`` would, so the switcher
hands sequences to it and steps it the same way (``launch`` sends, ``finish`` collects).

Ray places the actor and loads the expert; then one socket (``engine/expert_channel.py``) carries the new
hand-overs and aborts to it, and brings back the tokens of each of its engine steps, which ``finish`` collects:
the sequences stay here as mirrors that receive those tokens. Only token ids, sampling parameters and
generator states cross the network. An actor that dies (its connection closes, or it falls silent for longer
than ``ray_timeout_s``) fails the sequences it held with ``ExpertUnavailableError`` (finish_reason "error");
later hand-overs to it fail the same way at once.
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

from etr.engine.config import EngineConfig
from etr.engine.expert_channel import ChannelClosed, connect as connect_channel
from etr.engine.expert_worker import HEARTBEAT_S, HandOver, vocab_fingerprint
from etr.engine.llm_engine import check_prompt
from etr.engine.phases import phase
from etr.engine.sampling_params import SamplingParams
from etr.engine.sequence import Sequence, SequenceStatus
from etr.errors import ConfigError, ExpertUnavailableError

POLL_WAIT_S = 1.0  # a waiting finish returns as soon as tokens arrive; this only bounds an idle one


def ray_module():
    """Ray, or a named error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("expert_placement 'ray' needs Ray: pip install 'expert-token-routing[ray]'") from None
    return ray


def connect(config: EngineConfig) -> None:
    """Join ``config.ray_address``, else a running cluster, else start a local one (no dashboard, no usage
    statistics)."""
    ray = ray_module()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if config.ray_address is not None:
        try:
            ray.init(address=config.ray_address, log_to_driver=False)
        except (ConnectionError, ValueError) as e:
            raise ExpertUnavailableError(f"cannot join the Ray cluster at ray_address={config.ray_address!r}: "
                                         f"{e}") from None
        return
    try:
        ray.init(address="auto", log_to_driver=False)
    except ConnectionError:  # a cluster of this machine alone: every address on the loopback
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")


@dataclass(slots=True)
class PendingPoll:
    wait: bool  # finish may wait (up to POLL_WAIT_S) for the actor's next tokens: nothing else has work


class RemoteExpertEngine:
    """An expert checkpoint served by an ``ExpertWorker`` actor, driven like a local engine."""
    remote = True

    def __init__(self, config: EngineConfig, name: str, model_dir: str, device, tokenizer_dir: str | None):
        self.config, self.name, self.model_dir = config, name, str(model_dir)
        self.actor, info, channel = self._start(device, tokenizer_dir)
        self._init_state(info, channel)

    def _init_state(self, info: dict, channel) -> None:
        """Everything but the actor (tests drive a channel without Ray through this)."""
        self.label = f"expert {self.name}"  # in profiler spans
        self.tokenizer = None  # the facade writes text with the meta's tokenizer (same ids)
        self.switched: list[Sequence] = []  # experts never switch further
        self.seqs: dict[int, Sequence] = {}  # held by the actor (or about to be), by sequence id
        self.to_send: list[Sequence] = []
        self.pinned: set[int] = set()  # sequences that started here (route=), not handed over by the meta
        self.dead: ExpertUnavailableError | None = None
        self.undelivered: list[Sequence] = []  # failed by the actor's death, not yet returned by a step
        self.counts = {"kv_blocks_used": 0, "num_running": 0, "num_waiting": 0}
        self.sent_at: dict[int, float] = {}  # hand-overs sent, not yet answered: when
        self.frames_sent = 0
        self.last_heard = time.monotonic()
        self.channel, self.info = channel, info
        self.device, self.block_size = info["device"], info["block_size"]
        self.model_config = SimpleNamespace(vocab_size=info["vocab_size"], hidden_size=info["hidden_size"])
        self.vocab_fingerprint = info["vocab_fingerprint"]

    def _start(self, device, tokenizer_dir):
        ray = ray_module()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        from etr.engine.expert_worker import ExpertWorker
        connect(self.config)
        bundle = dict(self.config.expert_resources.get(self.name) or
                      ({"CPU": 1, "GPU": 1} if str(device).startswith("cuda") else {"CPU": 1}))
        deadline = time.monotonic() + self.config.ray_timeout_s
        group = placement_group([bundle])
        try:
            ray.get(group.ready(), timeout=self.config.ray_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise self._unavailable(f"no node offers {bundle} (waited {self.config.ray_timeout_s:g} s)") from None
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        actor = ray.remote(ExpertWorker).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), resources=custom or None,
            max_concurrency=1, scheduling_strategy=PlacementGroupSchedulingStrategy(group),
        ).remote(self.config, self.model_dir, str(device), tokenizer_dir, int(bundle.get("CPU", 0)) or None)
        # The actor ends with its last handle, but a placement group outlives it: release both with this object.
        self._release = weakref.finalize(self, _release, actor, group)
        try:
            info = ray.get(actor.info.remote(), timeout=max(deadline - time.monotonic(), 1.0))
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            remove_placement_group(group)
            raise self._unavailable(f"its weights did not load within {self.config.ray_timeout_s:g} s") from None
        except ray.exceptions.RayError as e:
            remove_placement_group(group)
            raise self._unavailable(f"it failed to load: {_cause(e)}") from None
        left = max(deadline - time.monotonic(), 5.0)
        try:
            host, port, secret = ray.get(actor.open_channel.remote(left), timeout=left)
            channel = connect_channel(host, port, secret, left, send_timeout=self.config.ray_timeout_s)
        except (ChannelClosed, ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
            self._release()
            raise self._unavailable(f"its channel did not open: {_cause(e)}") from None
        self._release.detach()
        self._release = weakref.finalize(self, _release, actor, group, channel)
        return actor, info, channel

    def _unavailable(self, why: str) -> ExpertUnavailableError:
        return ExpertUnavailableError(f"expert {self.name!r} ({self.model_dir}, Ray actor): {why}")

    # ---- what the switcher and the facade call ---------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        check_prompt(prompt_token_ids, params, self.info["vocab_size"], self.info["max_model_len"], self.block_size,
                     self.info["num_kv_blocks"])

    def check_available(self) -> None:
        """Raise ``ExpertUnavailableError`` once the actor is gone."""
        if self.dead is not None:
            raise ExpertUnavailableError(str(self.dead))

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> Sequence:
        """A request pinned to this expert: raises at once if the actor is gone."""
        self.validate_prompt(prompt_token_ids, params)
        self.check_available()
        seq = Sequence(prompt_token_ids, params, self.block_size, "cpu", prompt)
        self.pinned.add(seq.seq_id)
        self.adopt(seq)
        return seq

    def adopt(self, seq: Sequence) -> None:
        if self.dead is not None:
            self._fail(seq, self.dead)
            return
        if not self.seqs:  # silence while it held nothing says nothing: the liveness clock starts now
            self.last_heard = time.monotonic()
        self.seqs[seq.seq_id] = seq
        self.to_send.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.seqs or self.undelivered)

    def launch(self, wait: bool = True) -> PendingPoll | None:
        """Send the new hand-overs; ``wait``: let ``finish`` wait up to ``POLL_WAIT_S`` for the actor's next
        tokens (False when other engines have work: they must not stall)."""
        if self.dead is None and self.to_send:
            with phase(f"{self.label} send"):
                sent, self.to_send = self.to_send, []
                now = time.perf_counter()
                self.sent_at.update((s.seq_id, now) for s in sent)
                self._send([self._handover(s) for s in sent], [])
        if self.undelivered:  # failed requests are returned at once
            return PendingPoll(False)
        return PendingPoll(wait) if self.dead is None and self.seqs else None

    def _handover(self, seq: Sequence) -> HandOver:
        # A request pinned here was never the meta's: like a local expert's, it is seeded on the expert's device.
        carried = seq.generator is not None and seq.seq_id not in self.pinned
        state = bytes(seq.generator.get_state().cpu().numpy()) if carried else None
        device = seq.generator.device.type if carried else "cpu"
        return HandOver(seq.seq_id, list(seq.token_ids), seq.num_prompt_tokens, seq.params, state, device,
                        seq.stream, self.name, seq.switch_index or 0, seq.text)

    def finish(self, pending: PendingPoll) -> list[Sequence]:
        progressed = self._receive(pending.wait) if self.dead is None else []
        failed, self.undelivered = self.undelivered, []
        return list({id(s): s for s in progressed + failed}.values())

    def _receive(self, wait: bool) -> list[Sequence]:
        try:
            with phase(f"{self.label} wait"):
                frames = self.channel.receive(POLL_WAIT_S if wait and not self.undelivered else 0.0)
        except ChannelClosed as e:
            self._die(e)
            return []
        now = time.monotonic()
        if not frames:  # the worker speaks at least every HEARTBEAT_S between its steps while it holds sequences
            if self.seqs and now - self.last_heard > HEARTBEAT_S + self.config.ray_timeout_s:
                self._die(TimeoutError(f"no word from it for {now - self.last_heard:.0f} s"))
            return []
        self.last_heard = now
        progressed = []
        for frame in frames:
            if "failure" in frame:
                self._die(RuntimeError(frame["failure"]))
                return progressed
            self.counts = {k: frame[k] for k in self.counts}
            progressed += [self._apply(p) for p in frame["progress"] if p.seq_id in self.seqs]
        return progressed

    def _send(self, handovers: list[HandOver], aborts: list[int]) -> None:
        try:
            self.channel.send((handovers, aborts))
        except ChannelClosed as e:  # the requests it held come back failed from the next finish
            self._die(e)
            return
        self.frames_sent += 1

    def _apply(self, progress) -> Sequence:
        seq, now = self.seqs[progress.seq_id], time.perf_counter()
        if progress.error is not None:
            self._fail(seq, self._unavailable(f"it could not take the request: {progress.error}"))
            self.sent_at.pop(seq.seq_id, None)
            del self.seqs[seq.seq_id]
            self.pinned.discard(seq.seq_id)
            return seq
        if progress.held_s is not None and seq.seq_id in self.sent_at:  # the hand-over's first answer
            seq.switch_network_s = max(now - self.sent_at.pop(seq.seq_id) - progress.held_s, 0.0)
        seq.token_ids += progress.token_ids
        if progress.token_ids and seq.first_token_time is None:
            seq.first_token_time = now
        if progress.text is not None:
            seq.text = seq.text[:progress.text_from] + progress.text
        if progress.prefill_s is not None:
            seq.switch_prefill_s = progress.prefill_s
        if progress.finished:
            seq.status, seq.finish_reason, seq.finish_time = SequenceStatus.FINISHED, progress.finish_reason, now
            self.sent_at.pop(seq.seq_id, None)
            del self.seqs[seq.seq_id]
            self.pinned.discard(seq.seq_id)
        return seq

    def _die(self, error: Exception) -> None:
        """Fail every sequence the actor held (the next ``finish`` returns them) and release it."""
        self.dead = self._unavailable(f"the actor died: {_cause(error)}")
        failed = list(self.seqs.values())
        for seq in failed:
            self._fail(seq, self.dead)
        self.undelivered += failed
        self.seqs.clear()
        self.to_send.clear()
        self.pinned.clear()
        self.sent_at.clear()
        self.counts = dict.fromkeys(self.counts, 0)
        self._release()  # a hung actor still holds its resources and its placement group

    @staticmethod
    def _fail(seq: Sequence, error: ExpertUnavailableError) -> None:
        seq.status, seq.finish_reason, seq.error = SequenceStatus.FINISHED, "error", error
        seq.finish_time = time.perf_counter()

    def abort(self, seqs: list[Sequence]) -> None:
        """Forget these sequences here and free their blocks in the actor (sent at once)."""
        gone = [s for s in seqs if self.seqs.pop(s.seq_id, None) is not None]
        if not gone:
            return
        self.pinned.difference_update(s.seq_id for s in gone)
        self.to_send = [s for s in self.to_send if s not in gone]
        for seq in gone:
            self.sent_at.pop(seq.seq_id, None)
            if not seq.is_finished:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        if self.dead is None:
            self._send([], [s.seq_id for s in gone])

    def refresh(self) -> dict:
        """Ask the actor for its counts now (after every hand-over and abort sent before; a test and benchmark
        aid)."""
        if self.dead is None:
            ray = ray_module()
            try:
                self.counts = ray.get(self.actor.stats.remote(self.frames_sent), timeout=self.config.ray_timeout_s)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
                raise self._unavailable(f"it did not report its counts: {_cause(e)}") from None
        return self.counts

    def num_running(self) -> int:
        return self.counts["num_running"]

    def num_waiting(self) -> int:
        return self.counts["num_waiting"]

    def num_kv_blocks(self) -> int:
        return self.info["num_kv_blocks"]

    def kv_blocks_used(self) -> int:
        return self.counts["kv_blocks_used"]

    def all_free(self) -> bool:
        return self.dead is not None or self.refresh()["kv_blocks_used"] == 0


def _release(actor, group, channel=None) -> None:
    if channel is not None:
        channel.close()
    try:
        import ray
        from ray.util.placement_group import remove_placement_group
        if ray.is_initialized():
            ray.kill(actor)
            remove_placement_group(group)
    except Exception:  # noqa: BLE001 (at interpreter exit Ray may be gone already)
        pass


def _cause(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


__all__ = ["RemoteExpertEngine", "connect", "vocab_fingerprint"]
