"""Packed K pages against the row layout in whole engine decode steps, interleaved in one process.

    python bench/pack_ab.py [--model DIR] [--points 16x128 16x2048 16x4096 1x4096] [--rounds 8] [--steps 4]

On the CPU a bf16 engine stores K packed (``cpu_paged_decode.pack_k``) so that the decode attention gets 16
scores per bf16 dot instruction; ``ETR_CPU_PACK_K=0`` keeps the row layout V has. This machine's speed drifts
by tens of percent within minutes, so the two are not timed one after the other: for each point (batch x
context) the engine prefills, then decodes ``rounds`` pairs of rounds of ``steps`` steps, every layer's K pool
converted to the other layout between the rounds of a pair (outside the timing; which layout goes first
alternates). The figure is the median of the pairs' packed/rows ratios with its quartiles, beside each
layout's ms per step and the step's bandwidth floor (weights + the KV of the context, at the read bandwidth
measured at the start). Whole engine steps are timed (scheduling and sampling included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import decode_steps  # noqa: E402
from glue_ab import quartiles  # noqa: E402
from scaling import read_bandwidth, step_bytes, weight_bytes  # noqa: E402


def set_layout(runner, packed: bool) -> None:
    """Every layer's K pool in the packed or the row layout (a copy where it changes)."""
    from etr.kernels import cpu_paged_decode as K
    runner.kv_caches = [(K.pack_k(k) if packed and k.dim() == 4 else k if packed else K.unpack_k(k), v)
                        for k, v in runner.kv_caches]


def interleaved(llm, batch: int, context: int, rounds: int, steps: int) -> dict:
    """ms per step of each layout and the pairs' packed/rows ratios (see the module doc)."""
    runner = llm.engine.runner
    run, seqs = decode_steps(llm, batch, context, rounds * steps)
    ms = {True: [], False: []}
    ratios = []
    for i in range(rounds):
        pair = {}
        for packed in (True, False) if i % 2 == 0 else (False, True):
            set_layout(runner, packed)
            start = time.perf_counter()
            for _ in range(steps):
                llm.engine.step()
            pair[packed] = (time.perf_counter() - start) / steps * 1e3
            ms[packed].append(pair[packed])
        ratios.append(pair[True] / pair[False])
    set_layout(runner, True)
    llm.engine.abort(seqs)
    return {"packed_ms": quartiles(ms[True]), "rows_ms": quartiles(ms[False]), "ratio": quartiles(ratios)}


def parse_point(text: str) -> tuple[int, int]:
    try:
        batch, context = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"point {text!r}: expected BATCHxCONTEXT, e.g. 16x2048") from None
    if batch < 1 or context < 1:
        raise argparse.ArgumentTypeError(f"point {text!r}: batch and context must be >= 1")
    return batch, context


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--points", type=parse_point, nargs="+", default=[(16, 128), (16, 2048), (16, 4096), (1, 4096)],
                    help="BATCHxCONTEXT points")
    ap.add_argument("--rounds", type=int, default=8, help="pairs of rounds per point")
    ap.add_argument("--steps", type=int, default=4, help="decode steps per round")
    args = ap.parse_args(argv)
    import torch
    from etr import LLM
    model = args.model
    if model is None:
        from etr.default_model import default_model_dir
        model = str(default_model_dir(torch.float32))
    longest = max(c for _, c in args.points) + 2 * args.rounds * args.steps + 16
    llm = LLM(model, dtype="bfloat16", max_num_seqs=max(b for b, _ in args.points), max_model_len=longest)
    runner = llm.engine.runner
    if runner.kv_caches[0][0].dim() != 5:
        print("this engine's K pool is not packed here (cpu_paged_decode.packs_k: the op's bf16 path, pages of a "
              "multiple of 16, ETR_CPU_PACK_K); nothing to compare", file=sys.stderr)
        return 1
    bandwidth = read_bandwidth()
    from etr.models.loader import load_model
    weights = weight_bytes(load_model(model, torch.bfloat16, "cpu"))  # the engine's packed linears are not parameters
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weights / 1e6:.0f} MB; {args.rounds} pairs of "
          f"{args.steps} steps a point")
    print("| batch | context | floor ms | rows ms/step (q1 / median / q3) | packed ms/step | packed / rows "
          "(q1 / median / q3) | packed median x floor |")
    print("| ---: | ---: | ---: | --- | --- | --- | ---: |")
    for batch, context in args.points:
        floor = step_bytes(llm.engine.model_config, weights, batch, context, 2) / bandwidth * 1e3
        r = interleaved(llm, batch, context, args.rounds, args.steps)
        fmt = lambda q, d: " / ".join(f"{v:.{d}f}" for v in q)  # noqa: E731
        print(f"| {batch} | {context} | {floor:.1f} | {fmt(r['rows_ms'], 1)} | {fmt(r['packed_ms'], 1)} | "
              f"{fmt(r['ratio'], 3)} | {r['packed_ms'][1] / floor:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
