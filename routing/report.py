"""Evaluation reports: a markdown table, a JSON file and a routing confusion-matrix PNG."""

from __future__ import annotations

import json
from pathlib import Path

from etr.atomic_write import atomic_path


def pct(x: float | None) -> str:
    """A share as percent with one decimal ("-" for None or NaN)."""
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def accuracy_table(summary: dict, routed_methods=("random", "router", "etr")) -> list[str]:
    """Accuracy per domain and overall, routing accuracy and false routing, one row per method."""
    domains = sorted({d for m in summary.values() for d in m["domain_accuracy"]})
    head = ["method", *domains, "overall", "routing acc.", "false routing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, m in summary.items():
        routed = method in routed_methods
        cells = [method, *(pct(m["domain_accuracy"].get(d)) for d in domains), pct(m["accuracy"]),
                 pct(m["routing_accuracy"] if routed or method == "oracle" else None),
                 pct(m["false_routing"]) if routed else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def confusion_table(confusion: dict) -> list[str]:
    """Rows: question domain; columns: the model that answered; cells: question counts."""
    models = sorted({k for row in confusion.values() for k in row})
    lines = ["| domain | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
    for domain, row in confusion.items():
        lines.append(f"| {domain} | " + " | ".join(str(row.get(k, 0)) for k in models) + " |")
    return lines


def markdown(summary: dict, routed_methods=("random", "router", "etr")) -> str:
    """The accuracy table, then the routing confusion of every routed method."""
    lines = accuracy_table(summary, routed_methods)
    for method, m in summary.items():
        if method in routed_methods:
            lines += ["", f"Routing of `{method}` (rows: domain, columns: model that answered)", ""]
            lines += confusion_table(m["confusion"])
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))


def confusion_png(path: str | Path, summary: dict, routed_methods=("random", "router", "etr")) -> bool:
    """One heatmap per routed method (share of each domain's questions per model). Returns False, writing
    nothing, when matplotlib is not installed (``pip install 'expert-token-routing[plot]'``)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    panels = [(m, s["confusion"]) for m, s in summary.items() if m in routed_methods]
    if not panels:
        return False
    models = sorted({k for _, confusion in panels for row in confusion.values() for k in row})  # shared columns
    width = 1.5 + 0.55 * len(models)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4), squeeze=False)
    for ax, (method, confusion) in zip(axes[0], panels):
        domains = list(confusion)
        share = [[confusion[d].get(k, 0) / max(1, sum(confusion[d].values())) for k in models] for d in domains]
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
        ax.set_yticks(range(len(domains)), domains)
        for i, row in enumerate(share):
            for j, v in enumerate(row):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", color="white" if v > 0.5 else "black",
                        fontsize=8)
        ax.set_title(f"{method}: domain -> model (%)")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return True


def write_eval(out: Path, summary: dict, payload: dict) -> list[Path]:
    """``eval.md`` (the tables), ``eval.json`` (``payload``) and, where matplotlib is installed,
    ``routing.png`` in ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "eval.md") as tmp:
        tmp.write_text(markdown(summary))
    write_json(out / "eval.json", payload)
    wrote = [out / "eval.md", out / "eval.json"]
    return wrote + ([out / "routing.png"] if confusion_png(out / "routing.png", summary) else [])
