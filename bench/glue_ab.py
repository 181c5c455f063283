"""The CPU decode-step op's two glues against each other, interleaved in one process: what the raw glue saves.

    python bench/glue_ab.py [--model DIR] [--batch 1 16] [--context 32] [--rounds 20] [--steps 8] [--no-region]

The op (kernels/cpu_decode_step.cpp) runs the elementwise work between a bf16 model's linears either as ATen
ops ("aten", the forward's bits) or as loops of its own ("raw"). This machine's speed drifts by tens of
percent within minutes, so the two are not timed one after the other: for each batch size the engine decodes
``rounds`` pairs of rounds of ``steps`` steps, the glue switched between the rounds of a pair (which goes first
alternates), and the figure is the median of the pairs' ratios with its quartiles. Whole engine steps are
timed (scheduling and sampling included). Before timing, the two glues' greedy tokens are compared on the
batch's prompts (the raw glue rounds to bf16 where ATen rounds; its norm sums in another order and its exp is
not ATen's, so a token may differ): how many of the batch's generations differ, and from which token.

Only the raw glue can take the op's one parallel region a layer (batch 1-64 on the package's GEMM; see
kernels/cpu_decode_step.cpp), so by default the raw side runs as the engine runs it, with the region, and the
figure is the raw glue and the region together. ``--no-region`` turns the region off for the whole run (as
``ETR_CPU_STEP_REGION=0``), so that both sides run one op a linear and the figure is the glue alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import decode_steps  # noqa: E402


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[2]


def same_tokens(llm, batch: int, context: int, new_tokens: int) -> str:
    """How many of ``batch`` greedy generations from random prompts differ between the glues, and at which
    token each first differs (everything after the first difference differs by construction)."""
    import random
    from etr import SamplingParams
    rng = random.Random(1)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(context)] for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    step = llm.engine.runner.native_step
    outs = {}
    for glue in ("aten", "raw"):
        step.glue = glue
        outs[glue] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(outs["aten"], outs["raw"])]
    at = sorted(i for i in first if i is not None)
    return f"{len(at)} of {batch}" + (f" (from token {', '.join(map(str, at))})" if at else "")


def interleaved(llm, batch: int, context: int, rounds: int, steps: int) -> dict:
    """ms per step of each glue and the pairs' raw/aten ratios (see the module doc)."""
    step = llm.engine.runner.native_step
    run, seqs = decode_steps(llm, batch, context, rounds * steps)
    ms = {"aten": [], "raw": []}
    ratios = []
    for i in range(rounds):
        order = ("aten", "raw") if i % 2 == 0 else ("raw", "aten")
        pair = {}
        for glue in order:
            step.glue = glue
            start = time.perf_counter()
            for _ in range(steps):
                llm.engine.step()
            pair[glue] = (time.perf_counter() - start) / steps * 1e3
            ms[glue].append(pair[glue])
        ratios.append(pair["raw"] / pair["aten"])
    llm.engine.abort(seqs)
    return {"batch": batch, "aten_ms": quartiles(ms["aten"]), "raw_ms": quartiles(ms["raw"]),
            "ratio": quartiles(ratios)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes")
    ap.add_argument("--context", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--rounds", type=int, default=20, help="pairs of rounds per batch size")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round")
    ap.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared per prompt (0: skip)")
    ap.add_argument("--no-region", action="store_true",
                    help="the raw side without the op's one region a layer: the glue alone (see the module doc)")
    args = ap.parse_args(argv)
    import torch
    from etr import LLM
    model = args.model
    if model is None:
        from etr.default_model import default_model_dir
        model = str(default_model_dir(torch.float32))
    longest = args.context + max(args.check_tokens, 2 * args.rounds * args.steps + 8) + 8
    llm = LLM(model, dtype="bfloat16", max_num_seqs=max(args.batch), max_model_len=longest)
    step = llm.engine.runner.native_step
    if step is None or step.glue != "raw":
        print(f"the raw glue is not in use here (step: {step and step.glue}); nothing to compare", file=sys.stderr)
        return 1
    region_was = torch.ops.etr_cpu_step.set_region(not args.no_region)
    try:
        print(f"raw side {'without' if args.no_region else 'with'} the one region a layer where it applies")
        print("| batch | aten ms/step (q1 / median / q3) | raw ms/step | raw / aten (q1 / median / q3) | "
              "generations differing |")
        print("| ---: | --- | --- | --- | ---: |")
        for batch in args.batch:
            differ = same_tokens(llm, batch, args.context, args.check_tokens) if args.check_tokens else "-"
            r = interleaved(llm, batch, args.context, args.rounds, args.steps)
            fmt = lambda q, d: " / ".join(f"{v:.{d}f}" for v in q)  # noqa: E731
            print(f"| {batch} | {fmt(r['aten_ms'], 2)} | {fmt(r['raw_ms'], 2)} | {fmt(r['ratio'], 3)} | "
                  f"{differ} |", flush=True)
    finally:
        torch.ops.etr_cpu_step.set_region(region_was)
        step.glue = "raw"
    return 0


if __name__ == "__main__":
    sys.exit(main())
