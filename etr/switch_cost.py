"""Switching cost, the paper's Table 5 protocol: N queries, greedy, the same number of new tokens
(``ignore_eos``) with and without a switch at the first token, meta and expert of the same size.

The no-switch head row is zero (the meta keeps decoding); the switch row is a large multiple of the sum of the
queries' normalised first-step hidden states, so every query routes at token 0 (checked, not assumed).
Queries run one at a time (batch 1), as a user would send them.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

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
            dtype: str = "bfloat16", device: str = "cpu", trace: str | None = None, repeats: int = 2) -> SwitchCost:
    """Run the Table 5 protocol: the same queries with and without a switch at the first token.

    One meta and one expert serve both conditions; only the expert row changes (zero: never chosen; a large
    multiple of the queries' mean direction: chosen at token 0). Prefix caching is off, so every query
    prefills its whole context, the expert's after a switch included, as a new query would.
    """
    from etr import LLM, SamplingParams

    zero = torch.zeros(1, load_model_config(model_dir).hidden_size)
    with tempfile.TemporaryDirectory() as tmp:
        head = save_expert_head(Path(tmp) / "zero.safetensors", ExpertHead(["expert"], zero))
        llm = LLM(model_dir, dtype=dtype, device=device, max_model_len=1024, num_kv_blocks=512,
                  enable_prefix_caching=False, experts={"expert": expert_dir or model_dir}, expert_head=str(head))
    prompts = query_prompts(llm, n_queries)
    h = first_step_hidden(llm, prompts)
    direction = (h / h.norm(dim=-1, keepdim=True)).sum(0)
    rows = {"no_switch": torch.zeros_like(direction)[None],
            "switch": (direction * 1000.0 / (h @ direction).min().clamp(min=1e-3))[None]}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    runner, router = llm.engine.runner, llm.router
    runner.set_expert_rows(rows["switch"])
    llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    router.switch_bookkeeping_s, router.num_switches = 0.0, 0
    # Conditions alternate query by query and each query keeps its best of `repeats`, so machine noise
    # (larger than the effect on a shared 2-core CPU) hits both conditions alike.
    best = {label: [float("inf")] * len(prompts) for label in rows}
    prefill: dict[int, float] = {}
    paired = []  # relative cost of the switch in each back-to-back pair of runs
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            took = {}
            for label in rows if (i + r) % 2 == 0 else reversed(rows):  # neither condition always runs first
                runner.set_expert_rows(rows[label])
                start = time.perf_counter()
                out = llm.generate([prompt], params, use_tqdm=False)[0]
                took[label] = time.perf_counter() - start
                best[label][i] = min(best[label][i], took[label])
                _check_route(label, i, out)
                if label == "switch":
                    prefill[i] = min(prefill.get(i, float("inf")), out.metrics.switch_prefill_s)
            paired.append(100 * (took["switch"] - took["no_switch"]) / took["no_switch"])
    if trace:
        runner.set_expert_rows(rows["switch"])
        _write_trace(llm, prompts[0], params, trace)
    n, t0, t1 = len(prompts), sum(best["no_switch"]), sum(best["switch"])
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    return SwitchCost(n, new_tokens, t0 / n, t1 / n, 100 * (t1 - t0) / t0, sum(prefill.values()) / n,
                      router.switch_bookkeeping_s / max(router.num_switches, 1), statistics.median(paired),
                      (quartiles[0], quartiles[2]))


def _check_route(label: str, i: int, out) -> None:
    want = ("expert", 0) if label == "switch" else (None, None)
    if (out.expert, out.switch_index) != want:
        raise RuntimeError(f"{label}: query {i} routed to {out.expert} at {out.switch_index}, the protocol needs {want}")


def _write_trace(llm, prompt, params, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        llm.generate([prompt], params, use_tqdm=False)
    prof.export_chrome_trace(path)


def report(cost: SwitchCost) -> str:
    """A few lines of text for a SwitchCost."""
    return "\n".join([
        f"queries {cost.queries}, new tokens {cost.new_tokens} (greedy, ignore_eos, batch 1)",
        f"{'condition':<28}{'s/query':>10}",
        f"{'no switch (meta decodes)':<28}{cost.no_switch_s_per_query:>10.3f}",
        f"{'switch at first token':<28}{cost.switch_s_per_query:>10.3f}",
        f"overhead: {cost.overhead_pct:+.2f}% (sum of each query's best run); back-to-back pairs: median "
        f"{cost.paired_median_pct:+.2f}%, quartiles {cost.paired_quartiles_pct[0]:+.2f}% .. "
        f"{cost.paired_quartiles_pct[1]:+.2f}%",
        f"switch cost split per query: expert prefill {cost.expert_prefill_s_per_query * 1e3:.1f} ms, "
        f"bookkeeping {cost.bookkeeping_s_per_query * 1e6:.0f} us",
        f"expert prefill as a share of a no-switch query: "
        f"{100 * cost.expert_prefill_s_per_query / cost.no_switch_s_per_query:.2f}%",
    ])


def main(args) -> None:
    """``etr bench switch``: measure, print, and optionally write JSON and a trace."""
    from etr.default_model import default_model_dir
    model = args.model or str(default_model_dir(torch.float32))
    cost = measure(model, args.expert, args.queries, args.new_tokens, args.dtype, args.device, args.trace,
                   args.repeats)
    print(report(cost))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(cost), indent=2))
