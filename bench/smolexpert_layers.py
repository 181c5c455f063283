"""Which SmolExpert experts to fine-tune: the top layers only, or the whole model? Same data, epochs, rate and
seed; the cost (seconds) and the expert's accuracy on its domain's test and seen questions, each alone
(the oracle: the expert answers every question of its domain).

    python bench/smolexpert_layers.py LIB [--domain chemistry] [--layers 8 all] [--epochs 5] [--lr 2e-4]
                                          [--meta DIR] [--profile default] [--data-seed 0]

LIB holds a build's data (data/train.jsonl, test.jsonl and seen.jsonl), as ``etr smolexpert build`` writes it;
where LIB has none, only the build's data stage runs (``--profile``, ``--data-seed``: the same files the build
of that seed writes) and writes them there. The experts trained here go to a temporary directory. Prints one row
per setting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def accuracy(model_dir: str, questions) -> float:
    from etr import LLM, SamplingParams
    from etr.routing.eval_data import is_correct
    llm = LLM(model_dir, dtype="float32", max_model_len=512, max_num_seqs=32, num_kv_blocks=32 * 32 + 1)
    outs = llm.chat([[{"role": "user", "content": q.prompt}] for q in questions],
                    SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    return sum(is_correct(q, o.text) for q, o in zip(questions, outs)) / len(questions)


def ensure_data(lib: Path, profile: str, seed: int) -> None:
    """Write the build's data stage into ``lib/data`` unless it is there (the data of the build of ``seed``)."""
    from etr.routing.smolexpert.build import Build
    if (lib / "data" / "train.jsonl").exists():
        return
    stage = Build(lib, profile, seed, progress=False, log=print)
    stage.out = lib
    stage.data()
    print(f"wrote the {profile} profile's data of seed {seed} to {lib / 'data'}")


def main(argv: list[str] | None = None) -> int:
    from etr.default_model import default_model_dir
    from etr.routing.eval_data import load_exact_jsonl
    from etr.routing.smolexpert.sft import fine_tune
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lib")
    ap.add_argument("--domain", default="chemistry")
    ap.add_argument("--layers", nargs="+", default=["8", "all"], help="top layers trained, or 'all'")
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--meta", default=None, help="the chat model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--profile", default="default", help="the data's profile, where LIB has no data")
    ap.add_argument("--data-seed", type=int, default=0, help="the data's seed, where LIB has no data")
    args = ap.parse_args(argv)
    lib = Path(args.lib)
    ensure_data(lib, args.profile, args.data_seed)
    rows = [json.loads(line) for line in (lib / "data" / "train.jsonl").read_text().splitlines()]
    pairs = [(r["query"], r["response"]) for r in rows if r["domain"] == args.domain]
    test = [q for q in load_exact_jsonl(lib / "data" / "test.jsonl") if q.domain == args.domain]
    seen = [q for q in load_exact_jsonl(lib / "data" / "seen.jsonl") if q.domain == args.domain]
    meta = args.meta or str(default_model_dir(torch.float32))
    print(f"{args.domain}: {len(pairs)} pairs, {args.epochs:g} epochs, lr {args.lr:g}, batch {args.batch_size}; "
          f"{len(test)} test and {len(seen)} seen questions")
    print(f"{'layers':>8} {'steps':>6} {'train s':>8} {'final loss':>11} {'test acc':>9} {'seen acc':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            out = Path(tmp) / layers
            start = time.perf_counter()
            loss, steps = fine_tune(meta, out, pairs, args.epochs, args.lr, args.batch_size,
                                    None if layers == "all" else int(layers), args.seed, f"layers {layers}")
            took = time.perf_counter() - start
            print(f"{layers:>8} {steps:>6} {took:>8.0f} {loss:>11.4f} {100 * accuracy(str(out), test):>8.1f}% "
                  f"{100 * accuracy(str(out), seen):>8.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
