"""Which SmolExpert experts to fine-tune: the top layers only or the whole model, and for how many epochs? Each
setting (``LAYERS:EPOCHS``) trains every domain's expert on the same pairs with the same rate and seed; each
row is its cost (seconds) and the expert's accuracy alone on its domain's questions (the oracle: the expert
answers every question of its domain), then one row per setting with the mean over the domains.

    python bench/smolexpert_layers.py LIB [--on val|test] [--domain chemistry countries python]
                                          [--settings 8:5 all:2] [--lr 2e-4] [--meta DIR]
                                          [--profile default] [--data-seed 0]

``--on val`` (choosing a setting): the experts train on the training phrasings only and are scored on the
validation questions (validation entities in the validation phrasing, which these experts never saw);
neither the test questions nor the test phrasing is read. ``--on test`` (reporting a chosen setting): the
experts train on every phrasing a build trains them on (the validation one too) and are scored on the test
questions. Both also score the seen questions (trained facts in trained phrasings).

LIB holds a build's data (data/train.jsonl, val.jsonl, test.jsonl and seen.jsonl), as ``etr smolexpert build``
writes it; where LIB has none, only the build's data stage runs (``--profile``, ``--data-seed``: the same files
the build of that seed writes) and writes them there. The experts trained here go to a temporary directory.
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


def parse_setting(text: str) -> tuple[int | None, float]:
    """``"8:5"`` -> (8, 5.0); ``"all:2"`` -> (None, 2.0)."""
    layers, sep, epochs = text.partition(":")
    try:
        if not sep or float(epochs) <= 0 or (layers != "all" and int(layers) < 1):
            raise ValueError
        return (None if layers == "all" else int(layers)), float(epochs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"setting {text!r}: expected LAYERS:EPOCHS, LAYERS a count or 'all' "
                                         f"and EPOCHS > 0 (e.g. 8:5 or all:2)") from None


def training_pairs(lib: Path, domain: str, on: str) -> list[tuple[str, str]]:
    """The domain's expert pairs; for ``on == "val"`` the training phrasings only."""
    rows = [json.loads(line) for line in (lib / "data" / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["domain"] == domain]
    if on == "val":
        if any("phrasing" not in r for r in rows):
            raise SystemExit(f"{lib / 'data' / 'train.jsonl'} does not say each pair's phrasing (written before "
                             f"--on val existed): write the data again in an empty LIB")
        rows = [r for r in rows if r["phrasing"] == "train"]
    return [(r["query"], r["response"]) for r in rows]


def build_seed(profile: str, data_seed: int, domain: str, index: int) -> int:
    """The seed ``etr smolexpert build --seed data_seed`` trains ``domain``'s expert with (Build.expert_models);
    a domain the profile does not have: by its place in ``--domain``."""
    from etr.routing.smolexpert.build import PROFILES
    domains = PROFILES[profile].domains if profile in PROFILES else ()
    return data_seed + 1 + (domains.index(domain) if domain in domains else index)


def main(argv: list[str] | None = None) -> int:
    from etr.default_model import default_model_dir
    from etr.routing.eval_data import load_exact_jsonl
    from etr.routing.smolexpert.sft import fine_tune
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lib")
    ap.add_argument("--on", choices=["val", "test"], default="val", help="the questions that score the experts")
    ap.add_argument("--domain", nargs="+", default=["chemistry", "countries", "python"])
    ap.add_argument("--settings", nargs="+", type=parse_setting, default=[(8, 5.0), (None, 5.0)],
                    help="LAYERS:EPOCHS, LAYERS the top layers trained or 'all'")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=None,
                    help="the first domain's training seed, the next domain's one more (default: the seed the "
                         "build of --data-seed gives each domain's expert)")
    ap.add_argument("--meta", default=None, help="the chat model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--profile", default="default", help="the data's profile, where LIB has no data")
    ap.add_argument("--data-seed", type=int, default=0, help="the data's seed, where LIB has no data")
    args = ap.parse_args(argv)
    lib = Path(args.lib)
    ensure_data(lib, args.profile, args.data_seed)
    meta = args.meta or str(default_model_dir(torch.float32))
    scored = {d: [q for q in load_exact_jsonl(lib / "data" / f"{args.on}.jsonl") if q.domain == d] for d in args.domain}
    seen = {d: [q for q in load_exact_jsonl(lib / "data" / "seen.jsonl") if q.domain == d] for d in args.domain}
    pairs = {d: training_pairs(lib, d, args.on) for d in args.domain}
    for d in args.domain:
        print(f"{d}: {len(pairs[d])} pairs, {len(scored[d])} {args.on} and {len(seen[d])} seen questions")
    seeds = {d: args.seed + i if args.seed is not None else build_seed(args.profile, args.data_seed, d, i)
             for i, d in enumerate(args.domain)}
    print(f"lr {args.lr:g}, batch {args.batch_size}, seeds " + ", ".join(f"{d} {s}" for d, s in seeds.items()))
    print(f"{'domain':>10} {'layers':>6} {'epochs':>6} {'steps':>6} {'train s':>8} {'final loss':>11} "
          f"{args.on + ' acc':>9} {'seen acc':>9}")
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers, epochs in args.settings:
            name, acc, took = "all" if layers is None else str(layers), [], 0.0
            for d in args.domain:
                out = Path(tmp) / f"{name}-{epochs:g}-{d}"
                start = time.perf_counter()
                loss, steps = fine_tune(meta, out, pairs[d], epochs, args.lr, args.batch_size, layers,
                                        seeds[d], f"{d} {name}:{epochs:g}")
                trained = time.perf_counter() - start
                took += trained
                acc.append(accuracy(str(out), scored[d]))
                print(f"{d:>10} {name:>6} {epochs:>6g} {steps:>6} {trained:>8.0f} {loss:>11.4f} "
                      f"{100 * acc[-1]:>8.1f}% {100 * accuracy(str(out), seen[d]):>8.1f}%", flush=True)
            totals.append((name, epochs, took, sum(acc) / len(acc)))
    for name, epochs, took, mean in totals:
        print(f"{'mean':>10} {name:>6} {epochs:>6g} {'':>6} {took:>8.0f} {'':>11} {100 * mean:>8.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
