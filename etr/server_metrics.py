"""The server's Prometheus metrics: engine gauges and counters read from ``AsyncLLM.stats`` at each scrape,
and per-request latency histograms observed as outputs stream out."""

from __future__ import annotations

import time

from etr.async_llm import AsyncLLM

# Seconds; CPU engines are slower than GPU ones, so the buckets reach into tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """One registry per app: ``etr_requests_running``, ``etr_requests_waiting``, ``etr_kv_blocks_used``/
    ``_total{model}``, ``etr_expert_switches_total{expert}``, ``etr_generated_tokens_total``,
    ``etr_switch_prefill_seconds``, ``etr_time_to_first_token_seconds``, ``etr_inter_token_latency_seconds``."""

    def __init__(self, llm: AsyncLLM):
        from prometheus_client import CollectorRegistry, Histogram
        self.llm, self.registry = llm, CollectorRegistry()
        self.registry.register(_EngineCollector(llm))
        hist = lambda name, text: Histogram(name, text, buckets=LATENCY_BUCKETS, registry=self.registry)  # noqa: E731
        self.switch_prefill = hist("etr_switch_prefill_seconds", "Seconds an expert spent prefilling a hand-over")
        self.ttft = hist("etr_time_to_first_token_seconds", "Seconds from a request's arrival to its first token")
        self.itl = hist("etr_inter_token_latency_seconds", "Seconds between a request's successive tokens")

    def request_started(self) -> RequestTiming:
        """A timer for one request, started now."""
        return RequestTiming(self)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTiming:
    """Observes one request's time to first token, inter-token latencies and switch prefill."""
    __slots__ = ("metrics", "start", "last")

    def __init__(self, metrics: ServerMetrics):
        self.metrics, self.start, self.last = metrics, time.perf_counter(), None

    def observe(self, delta) -> None:
        now, n = time.perf_counter(), len(delta.token_ids)
        if n and self.last is None:
            self.metrics.ttft.observe(now - self.start)
            n, self.last = n - 1, now
        if n:
            for _ in range(n):  # a delta holds the tokens of one step per model; spread its gap over them
                self.metrics.itl.observe((now - self.last) / n)
            self.last = now
        if delta.finished and delta.output.expert is not None and delta.output.metrics.switch_prefill_s:
            self.metrics.switch_prefill.observe(delta.output.metrics.switch_prefill_s)


class _EngineCollector:
    def __init__(self, llm: AsyncLLM):
        self.llm = llm

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.llm.stats
        yield GaugeMetricFamily("etr_requests_running", "Requests decoding in any model", value=s.num_running)
        yield GaugeMetricFamily("etr_requests_waiting", "Requests queued for any model", value=s.num_waiting)
        for metric, values, text in (("etr_kv_blocks_used", s.kv_blocks_used, "KV blocks held by requests"),
                                     ("etr_kv_blocks_total", s.kv_blocks_total, "KV blocks in the pool")):
            family = GaugeMetricFamily(metric, text, labels=["model"])
            for model, value in values.items():
                family.add_metric([model], value)
            yield family
        switches = CounterMetricFamily("etr_expert_switches", "Hand-overs to each expert", labels=["expert"])
        for expert, value in s.switches.items():
            switches.add_metric([expert], value)
        yield switches
        yield CounterMetricFamily("etr_generated_tokens", "Tokens generated", value=s.generated_tokens)
