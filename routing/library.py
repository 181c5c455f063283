"""What the library builds (MiniExpert, SmolExpert) share: their stages run into ``DIR.partial`` and renamed
when complete, expert heads with dynamic extension and the router baseline, evaluation with the extended
head, and the query-set section of the report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from etr.errors import ConfigError


def run_stages(final: Path, partial: Path, stages: list[tuple[str, object]], timings: dict, log, tag: str) -> None:
    """Run ``stages`` (name, function) in order, each writing into ``partial`` (created empty; ``final`` must be
    absent or empty), timing each into ``timings`` and the total; ``finish`` publishes the build afterwards."""
    start_partial(final, partial)
    start = time.perf_counter()
    for name, fn in stages:
        log(f"[{tag}] {name} ...")
        begun = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - begun
        log(f"[{tag}] {name}: {timings[name]:.1f} s")
    timings["total"] = time.perf_counter() - start


def start_partial(final: Path, partial: Path) -> None:
    """Refuse a non-empty ``final`` before writing anything; give the build an empty ``partial`` (one left by a
    failed build is cleared)."""
    if final.exists() and any(final.iterdir()):
        raise ConfigError(f"{final} exists and is not empty; choose another directory or remove it")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)


def finish(final: Path, partial: Path) -> None:
    """Publish a complete build: ``partial`` becomes ``final`` (an empty ``final`` is replaced)."""
    if final.exists():
        final.rmdir()
    partial.rename(final)


def write_heads(out: Path, meta_dir: str | Path, experts: list[str], base: list[str], cfg, seed: int,
                extension_cfg=None) -> None:
    """From ``out/sets.jsonl``: ``head.safetensors`` (every expert), ``head_base.safetensors`` (``base``),
    ``head_extended.safetensors`` (the other experts added to the base head with their rows only) and the
    router baseline ``router.safetensors``; ``cfg()`` gives each training run its ``TrainConfig``, except the
    added rows', which ``extension_cfg()`` gives when given."""
    from etr.models import load_model
    from etr.models.expert_head import save_expert_head
    from etr.routing.classifier import save_classifier, train_router
    from etr.routing.collect import read_sets
    from etr.routing.train import train_head
    rows = read_sets(out / "sets.jsonl")
    meta = load_model(meta_dir, torch.float32, "cpu")
    added = [e for e in experts if e not in base]
    full, _ = train_head(meta, rows, experts, cfg=cfg())
    save_expert_head(out / "head.safetensors", full)
    head_base, _ = train_head(meta, [r for r in rows if r["expert"] in base or r["expert"] is None], base, cfg=cfg())
    save_expert_head(out / "head_base.safetensors", head_base)
    extended, _ = train_head(meta, [r for r in rows if r["expert"] in added or r["expert"] is None], added,
                             old=head_base, cfg=(extension_cfg or cfg)())
    save_expert_head(out / "head_extended.safetensors", extended)
    save_classifier(out / "router.safetensors", train_router(meta, rows, seed))


def evaluate_library(out: Path, setup, questions, progress: bool) -> list:
    """Every method on ``questions`` with ``out``'s head and router, then ETR with the extended head
    (method ``etr_extended``)."""
    from dataclasses import replace
    from etr.models import load_model
    from etr.routing.classifier import load_classifier
    from etr.routing.evaluate import METHODS, evaluate
    clf = load_classifier(out / "router.safetensors")
    clf.model = load_model(setup.meta, torch.float32, "cpu")
    records = evaluate(setup, questions, list(METHODS), clf, progress)
    extended = replace(setup, head=str(out / "head_extended.safetensors"))
    for r in evaluate(extended, questions, ["etr"], progress=progress):
        r.method = "etr_extended"
        records.append(r)
    return records


def write_report(out: Path, results: dict, text: str, records: list, log) -> dict:
    """``results.md`` (``text``), ``results.json`` (``results`` and every answer) and ``routing.png``; returns
    ``results``."""
    from etr.routing import report
    from etr.routing.evaluate import records_json
    (out / "results.md").write_text(text)
    report.write_json(out / "results.json", results | {"records": records_json(records)})
    report.confusion_png(out / "routing.png", results["summary"], ("router", "etr", "etr_extended"))
    log(text)
    return results


def query_set_lines(results: dict) -> list[str]:
    """The report's query-set section: pairs per expert and how pure each set came out."""
    lines = ["## Query sets (Eq. 3, loss gap > tau, ties to the largest gap)", "",
             "| expert | pairs | share from its own domain |", "|---|---|---|"]
    for e, n in results["set_sizes"].items():
        purity = results["set_purity"].get(e)
        lines.append(f"| {e} | {n} | {'-' if purity is None else f'{100 * purity:.1f}%'} |")
    return lines
