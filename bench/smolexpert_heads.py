"""Redo a finished SmolExpert build's last two stages (expert tokens, evaluation) with the current code, on the
same experts, query sets and test data: how a change to the training or choice of the expert tokens scores on
builds already made, without fine-tuning the experts again (~40 minutes a build on a 2-core CPU). The data
stage runs again: its validation split may differ from LIB's, every other file must be LIB's byte for byte.

    python bench/smolexpert_heads.py LIB OUT [--no-progress]

OUT gets this code's data/ (LIB's collect.jsonl, which holds the meta's answers, copied), LIB's experts/ (hard
links where the filesystem allows, else copies) and sets.jsonl, then
new heads, router and results, written to OUT.partial and renamed when complete, as a build does (a failed run
leaves OUT.partial, which the next run clears). LIB must come from the same meta and profile settings as this
code's (the expert tokens' grid aside). OUT's results.json keeps LIB's times of the stages it did not redo, so
its total is what the build would have taken with this code. Prints the bars; exits 1 when one fails, as the
build does, and 2 on a refused LIB or OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from etr.errors import ConfigError, ETRError

REDONE = ("expert tokens", "evaluation")
REGENERATED = ("val.jsonl",)  # the validation split may change; what the experts and query sets saw may not


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def restore(b, lib: Path, old: dict) -> None:
    """Give the build ``b`` LIB's files and the state its earlier stages handed on."""
    from etr.routing.library import start_partial
    kept = {k: v for k, v in asdict(b.p).items() if not k.startswith("head_")}
    differ = sorted(k for k, v in kept.items() if json.loads(json.dumps(v)) != old["settings"].get(k))
    if old["meta"] != b.meta or differ:
        raise ConfigError(f"{lib} was built from another meta or profile settings ({differ or old['meta']}); "
                          "its experts would be reported under this code's")
    start_partial(b.final, b.out)
    b.data()
    differ = [f.name for f in sorted((b.out / "data").iterdir()) if f.name not in REGENERATED and
              (not (lib / "data" / f.name).is_file() or f.read_bytes() != (lib / "data" / f.name).read_bytes())]
    if differ:
        shutil.rmtree(b.out)
        raise ConfigError(f"this code's data stage does not give {lib}'s data/{', data/'.join(differ)}; {lib}'s "
                          "experts, query sets or test questions came from other data")
    shutil.copy2(lib / "data" / "collect.jsonl", b.out / "data" / "collect.jsonl")
    shutil.copytree(lib / "experts", b.out / "experts", copy_function=link_or_copy)
    shutil.copy2(lib / "sets.jsonl", b.out / "sets.jsonl")
    b.timings = {k: v for k, v in old["timings_s"].items() if k not in (*REDONE, "total")}
    b.expert_loss, b.expert_steps = old["expert_loss"], old["expert_steps"]
    b.set_sizes, b.set_purity = old["set_sizes"], old["set_purity"]


def redo(lib: Path, out: Path, progress: bool = True) -> dict:
    """OUT from LIB with the expert tokens and the evaluation redone; returns the results."""
    from etr.routing.library import finish
    from etr.routing.smolexpert.build import Build
    old = json.loads((lib / "results.json").read_text())
    b = Build(out, old["profile"], old["seed"], progress, print)
    restore(b, lib, old)
    for name, stage in zip(REDONE, (b.heads, b.evaluate)):
        print(f"[smolexpert_heads] {name} ...", flush=True)
        begun = time.perf_counter()
        stage()
        b.timings[name] = time.perf_counter() - begun
    b.timings["total"] = sum(b.timings.values())
    results = b.write_results()
    finish(b.final, b.out)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lib", type=Path, help="a finished build (etr smolexpert build)")
    ap.add_argument("out", type=Path, help="where the redone library goes (absent or empty)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        results = redo(args.lib, args.out, not args.no_progress)
    except ETRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for bar in results["bars"]:
        print(f"{'holds' if bar['holds'] else 'FAILS'}  {bar['bar']}: {bar['value']:.3f}")
    return 0 if all(bar["holds"] for bar in results["bars"]) else 1


if __name__ == "__main__":
    sys.exit(main())
