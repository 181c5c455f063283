"""What a finished or streaming request hands back to the caller."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock timestamps (``time.perf_counter``) and derived figures for one request."""
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    switch_prefill_s: float = 0.0  # filled by expert routing
    switch_network_s: float = 0.0  # a remote expert's hand-off over the network (0 for in-process experts)

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first output token (None before it)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def total_time(self) -> float | None:
        """Seconds from arrival to the end of the request (None while it runs)."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """One request's result; ``generate`` returns these in prompt order.

    ``token_ids`` holds every generated id, a final EOS or stop id included; ``text`` excludes that id
    and is trimmed before a matched stop string. ``finish_reason`` is "stop" or "length" ("abort" for an aborted
request, "error" for one whose remote expert failed).
    ``expert`` and ``switch_index`` stay None unless expert routing took the request over.
    """
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    metrics: RequestMetrics
    expert: str | None = None
    switch_index: int | None = None


@dataclass(slots=True)
class StreamDelta:
    """What one engine step added to a streamed request. Concatenating every ``text`` gives the final text."""
    request_id: int
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    output: RequestOutput | None = field(default=None)  # the full output, on the last delta
