"""Switching cost, the paper's Table 5 protocol: N queries, greedy, the same number of new tokens
(``ignore_eos``) with and without a switch at the first token, meta and expert of the same size.

The no-switch head row is zero (the meta keeps decoding); the switch row is a large multiple of the sum of the
queries' normalised first-step hidden states, so every query routes at token 0 (checked, not assumed).
Queries run one at a time (batch 1), as a user would send them.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from etr.errors import ConfigError, ETRError
from etr.models.config import load_model_config
from etr.models.expert_head import ExpertHead, save_expert_head
from etr.routing.nll import forward_uncached

QUERIES = [
    "What is the capital of France?", "Explain photosynthesis briefly.", "Give me three tips for studying.",
    "What causes the seasons on Earth?", "Describe a cat in two sentences.", "How do vaccines work?",
    "What is a prime number?", "Summarise the plot of Romeo and Juliet.", "Why is the sky blue?",
    "What is the boiling point of water?", "Name a famous painter and one of their works.",
    "How does a bicycle stay upright?",
]


@dataclass(slots=True)
class SwitchCost:
    """Times of the Table 5 protocol and the overhead they give."""
    queries: int
    new_tokens: int
    no_switch_s_per_query: float
    switch_s_per_query: float
    overhead_pct: float
    expert_prefill_s_per_query: float
    bookkeeping_s_per_query: float
    paired_median_pct: float  # median over (query, repeat) of the two conditions run back to back
    paired_quartiles_pct: tuple[float, float]  # their 25th and 75th percentiles: the noise to read it against
    # A distribution-free interval for the median (median_interval) and its coverage: the verdict reads it.
    paired_median_interval_pct: tuple[float, float] = (float("nan"), float("nan"))
    interval_coverage: float = float("nan")
    placement: str = "local"  # where the expert ran: "local" (in-process) or "ray" (an actor)
    # With placement "ray", the same switched queries with the expert in-process, for the remote costs:
    switch_local_s_per_query: float | None = None
    network_s_per_switch: float = 0.0  # the hand-off's network and serialization time
    remote_streaming_pct: float | None = None  # remote minus in-process decode time, over in-process, per token

BAR_PCT = 2.0  # the bar: a switch costs less than this share of a query, end to end


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """An interval that holds the median of the population ``values`` were drawn from with probability at
    least ``confidence``, assuming nothing of its shape: the order statistics x_(k) .. x_(n+1-k) for the
    largest k whose coverage, 1 - 2 P(Binomial(n, 1/2) < k), reaches ``confidence``. With too few values to
    reach it, (min, max) and their lower coverage. Returns (low, high, coverage)."""
    if not values:
        raise ValueError("median_interval: no values")
    if not 0 < confidence < 1:
        raise ValueError(f"median_interval: confidence {confidence} must be in (0, 1)")
    xs, n = sorted(values), len(values)
    below = [math.comb(n, i) / 2 ** n for i in range(n + 1)]  # P(Binomial(n, 1/2) = i)
    k = 1
    while k + 1 <= (n + 1) // 2 and 1 - 2 * sum(below[:k + 1]) >= confidence:
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * sum(below[:k])


CONFIDENCE = 0.95  # the interval's coverage that the verdict asks for


def verdict(low: float, high: float, coverage: float, bar: float = BAR_PCT) -> str:
    """"holds" when the whole interval is under the bar, "fails" when it is all at or over it, "undecided"
    when it straddles it (the noise is larger than the distance to the bar), and "too few pairs" when so few
    were run that (min, max) covers the median less often than ``CONFIDENCE`` (fewer than 6 pairs)."""
    if coverage < CONFIDENCE:
        return "too few pairs"
    return "holds" if high < bar else "fails" if low >= bar else "undecided"


@torch.inference_mode()
def first_step_hidden(llm, prompts: list[list[int]]) -> torch.Tensor:
    """The meta's last hidden state after each prompt (to build a head row that routes at token 0)."""
    hidden, starts = forward_uncached(llm.engine.runner.model, prompts)
    return hidden[[s + len(p) - 1 for s, p in zip(starts, prompts)]].float().cpu()


def query_prompts(llm, n: int) -> list[list[int]]:
    """The protocol's queries in the chat template; random-weight checkpoints without a tokenizer get fixed
    token-id prompts of a chat prompt's length instead."""
    if llm.tokenizer is not None and getattr(llm.tokenizer, "chat_template", None):
        return [llm.chat_prompt_ids([{"role": "user", "content": q}]) for q in (QUERIES * 8)[:n]]
    g = torch.Generator().manual_seed(0)
    vocab = llm.engine.model_config.vocab_size
    return [torch.randint(0, vocab, (32,), generator=g).tolist() for _ in range(n)]


def measure(model_dir: str, expert_dir: str | None = None, n_queries: int = 8, new_tokens: int = 128,
            dtype: str = "bfloat16", device: str = "cpu", trace: str | None = None, repeats: int = 2,
            placement: str = "local", ray_address: str | None = None) -> SwitchCost:
    """Run the Table 5 protocol: the same queries with and without a switch at the first token.

    One meta and one expert serve both conditions; only the expert row changes (zero: never chosen; a large
    multiple of the queries' mean direction: chosen at token 0). Prefix caching is off, so every query
    prefills its whole context, the expert's after a switch included, as a new query would. With
    ``placement="ray"`` the expert runs in a Ray actor, and a third condition runs the switched queries with
    the expert in-process, so that the remote hand-off and streaming costs are measured against it.
    """
    from etr import SamplingParams

    zero = torch.zeros(1, load_model_config(model_dir).hidden_size)
    with tempfile.TemporaryDirectory() as tmp:
        head = save_expert_head(Path(tmp) / "zero.safetensors", ExpertHead(["expert"], zero))
        llm = _build(model_dir, expert_dir, str(head), dtype, device, placement, ray_address)
        local = _build(model_dir, expert_dir, str(head), dtype, device, "local") if placement == "ray" else None
    prompts = query_prompts(llm, n_queries)
    h = first_step_hidden(llm, prompts)
    direction = (h / h.norm(dim=-1, keepdim=True)).sum(0)
    switch_row = (direction * 1000.0 / (h @ direction).min().clamp(min=1e-3))[None]
    conditions = {"no_switch": (llm, torch.zeros_like(direction)[None]), "switch": (llm, switch_row)}
    if local is not None:
        conditions["switch_local"] = (local, switch_row)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for model, row in conditions.values():  # warm-up, every model and path
        model.engine.runner.set_expert_rows(row)
        model.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    switcher = llm.switcher
    switcher.switch_bookkeeping_s, switcher.num_switches = 0.0, 0
    # Conditions rotate query by query and each query keeps its best of `repeats`, so machine noise
    # (larger than the effect on a shared 2-core CPU) hits every condition alike.
    best = {label: [float("inf")] * len(prompts) for label in conditions}
    prefill: dict[int, float] = {}
    network: list[float] = []
    paired = []  # relative cost of the switch in each back-to-back pair of runs
    labels = list(conditions)
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            took = {}
            shift = (i + r) % len(labels)
            for label in labels[shift:] + labels[:shift]:  # no condition always runs first
                model, row = conditions[label]
                model.engine.runner.set_expert_rows(row)
                start = time.perf_counter()
                out = model.generate([prompt], params, use_tqdm=False)[0]
                took[label] = time.perf_counter() - start
                best[label][i] = min(best[label][i], took[label])
                _check_route(label, i, out)
                if label == "switch":
                    prefill[i] = min(prefill.get(i, float("inf")), out.metrics.switch_prefill_s)
                    network.append(out.metrics.switch_network_s)
            paired.append(100 * (took["switch"] - took["no_switch"]) / took["no_switch"])
    if trace:
        llm.engine.runner.set_expert_rows(switch_row)
        _write_trace(llm, prompts[0], params, trace)
    n, t0, t1 = len(prompts), sum(best["no_switch"]), sum(best["switch"])
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    low, high, coverage = median_interval(paired, CONFIDENCE)
    cost = SwitchCost(n, new_tokens, t0 / n, t1 / n, 100 * (t1 - t0) / t0, sum(prefill.values()) / n,
                      switcher.switch_bookkeeping_s / max(switcher.num_switches, 1), statistics.median(paired),
                      (quartiles[0], quartiles[2]), (low, high), coverage, placement)
    if local is not None:
        t_local, hand_off = sum(best["switch_local"]), statistics.median(network)
        cost.switch_local_s_per_query, cost.network_s_per_switch = t_local / n, hand_off
        cost.remote_streaming_pct = 100 * (t1 - t_local - n * hand_off) / t_local
    return cost


def _build(model_dir: str, expert_dir: str | None, head: str, dtype: str, device: str, placement: str,
           ray_address: str | None = None):
    from etr import LLM
    # An actor's torch uses as many threads as its CPUs: give it this process's, as the in-process expert has.
    resources = {"expert": {"CPU": torch.get_num_threads()}} if placement == "ray" and device == "cpu" else {}
    return LLM(model_dir, dtype=dtype, device=device, max_model_len=1024, num_kv_blocks=512,
               enable_prefix_caching=False, experts={"expert": expert_dir or model_dir}, expert_head=head,
               expert_placement={"expert": placement}, expert_resources=resources, ray_address=ray_address)


def _check_route(label: str, i: int, out) -> None:
    want = ("expert", 0) if label.startswith("switch") else (None, None)
    if (out.expert, out.switch_index) != want:
        raise RuntimeError(f"{label}: query {i} routed to {out.expert} at {out.switch_index}, the protocol needs {want}")


def _write_trace(llm, prompt, params, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        llm.generate([prompt], params, use_tqdm=False)
    prof.export_chrome_trace(path)
    from etr.engine.phases import format_totals, phase_totals
    print(f"trace of one switched request: {path}\n{format_totals(phase_totals(prof))}")


def report(cost: SwitchCost) -> str:
    """A few lines of text for a SwitchCost."""
    return "\n".join([
        f"queries {cost.queries}, new tokens {cost.new_tokens} (greedy, ignore_eos, batch 1)",
        f"{'condition':<28}{'s/query':>10}",
        f"{'no switch (meta decodes)':<28}{cost.no_switch_s_per_query:>10.3f}",
        f"{'switch at first token':<28}{cost.switch_s_per_query:>10.3f}",
        f"end-to-end switching overhead (the headline): median {cost.paired_median_pct:+.2f}% over the "
        f"back-to-back pairs, quartiles {cost.paired_quartiles_pct[0]:+.2f}% .. {cost.paired_quartiles_pct[1]:+.2f}%",
        f"{100 * cost.interval_coverage:.0f}% interval for the median {cost.paired_median_interval_pct[0]:+.2f}% .. "
        f"{cost.paired_median_interval_pct[1]:+.2f}%: bar < {BAR_PCT:g}% {_verdict_line(cost)}",
        f"beside it: sum of each query's best run {cost.overhead_pct:+.2f}%; expert prefill "
        f"{cost.expert_prefill_s_per_query * 1e3:.1f} ms = "
        f"{100 * cost.expert_prefill_s_per_query / cost.no_switch_s_per_query:.2f}% of a no-switch query; "
        f"bookkeeping {cost.bookkeeping_s_per_query * 1e6:.0f} us",
    ] + ([] if cost.switch_local_s_per_query is None else [
        f"expert in a Ray actor: switched query {cost.switch_s_per_query:.3f} s vs {cost.switch_local_s_per_query:.3f}"
        f" s in-process; hand-off over the network {cost.network_s_per_switch * 1e3:.2f} ms per switch; "
        f"streaming back {cost.remote_streaming_pct:+.2f}% per generated token over in-process",
    ]))


def _verdict_line(cost: SwitchCost) -> str:
    said = verdict(*cost.paired_median_interval_pct, cost.interval_coverage)
    return {"holds": "holds", "fails": "FAILS",
            "undecided": "undecided: the interval straddles it (more --repeats or --queries narrow it)",
            "too few pairs": f"not judged: {cost.queries} queries x their repeats are too few pairs for a "
                             f"{100 * CONFIDENCE:.0f}% interval"}[said]


def main(argv: list[str] | None = None) -> int:
    """``python bench/switch_cost.py [options]`` (what ``etr bench switch`` runs; the options are that
    command's, see ``etr bench switch --help``): measure, print, and optionally write JSON and a trace."""
    import sys
    from etr.cli import build_parser, placement_options
    from etr.default_model import default_model_dir
    args = build_parser().parse_args(["bench", "switch", *(sys.argv[1:] if argv is None else argv)])
    model = args.model or str(default_model_dir(torch.float32))
    placement = placement_options(args)["expert_placement"]
    if set(placement) - {"expert"}:
        raise ConfigError(f"--expert-placement names {sorted(set(placement) - {'expert'})}: the protocol's one "
                          "expert is called 'expert' (--expert-placement expert=ray)")
    placement = placement.get("expert", "local")
    cost = measure(model, args.expert, args.queries, args.new_tokens, args.dtype, args.device, args.trace,
                   args.repeats, placement, args.ray_address)
    print(report(cost))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(cost), indent=2))


if __name__ == "__main__":
    import sys
    try:
        sys.exit(main())
    except ETRError as e:
        print(f"etr: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
