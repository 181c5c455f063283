"""Expert Token Routing across engines (Algorithm 1): the meta decodes; a sequence whose next token is an
expert token moves to that expert's engine, which prefills the shared context into its own KV pool and
decodes on. Only token ids cross devices."""

from __future__ import annotations

import time
from collections import Counter

from etr.engine.llm_engine import LLMEngine
from etr.engine.phases import phase
from etr.engine.sequence import Sequence, SequenceStatus


class Switcher:
    """Steps the meta's and the experts' engines and hands switched sequences over."""
    def __init__(self, meta: LLMEngine, experts: dict[str, LLMEngine], row_names: list[str]):
        self.meta = meta
        self.experts = experts
        self.row_names = row_names  # expert name of each expert-token row, in row order
        # Several names may share one engine (same checkpoint on the same device): step each once.
        self.engines = list({id(e): e for e in [meta, *experts.values()]}.values())
        for engine in self.engines[1:]:  # profiler spans say which expert ("expert astro prefill")
            engine.label = "expert " + "/".join(n for n, e in experts.items() if e is engine)
        self.num_switches = 0
        self.switches: Counter[str] = Counter()  # hand-overs per expert name
        self.switch_bookkeeping_s = 0.0

    def has_unfinished(self) -> bool:
        """Whether any model still holds a waiting or running sequence."""
        return any(e.has_unfinished() for e in self.engines)

    def step(self) -> list[Sequence]:
        """One step of every engine with work; returns the sequences that progressed. Every engine's step is
        launched before any is waited for, so on CUDA the models run side by side on their own streams."""
        busy = [e for e in self.engines if e.has_unfinished()]
        # Remote experts first: their actors then work while the local engines compute their own steps.
        busy.sort(key=lambda e: not e.remote)
        launched = [(e, e.launch(wait=len(busy) == 1) if e.remote else e.launch()) for e in busy]
        progressed = []
        for engine, pending in launched:
            if pending is not None:
                progressed += engine.finish(pending)
        self._hand_over()
        return progressed

    def _hand_over(self) -> None:
        # Most steps hand nothing over: they skip the span and the clock, which would otherwise add a few
        # microseconds a step to every request and charge them to the switches' bookkeeping.
        if not any(e.switched for e in self.engines):
            return
        start = time.perf_counter()
        with phase("hand-over"):
            self._adopt_switched()
        self.switch_bookkeeping_s += time.perf_counter() - start

    def _adopt_switched(self) -> None:
        for engine in self.engines:
            switched, engine.switched = engine.switched, []
            for seq in switched:
                name = self.row_names[seq.pending_expert]
                seq.expert, seq.switch_index, seq.pending_expert = name, seq.num_output_tokens, None
                self.experts[name].adopt(seq)
                self.num_switches += 1
                self.switches[name] += 1

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop ``seqs`` wherever they are (any model, or between two), freeing their KV blocks."""
        for engine in self.engines:
            engine.abort(seqs)
        for seq in seqs:  # handed over but not yet adopted
            if not seq.is_finished:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, seq.finish_reason or "abort"

    def all_free(self) -> bool:
        """Whether every model's KV pool is back to all free (no block leaked)."""
        return all(e.all_free() for e in self.engines)
