"""Choosing the expert tokens' training settings on a validation split, never on the test set.

Each candidate ``TrainConfig`` trains the rows of every expert on the same cached features of the query sets;
the validation questions (their own entities and phrasing) are scored by the decision greedy decoding makes at
the first generated position: a domain's question should pick its expert's row, a general request no expert
row. The score is routing accuracy minus false routing; ties go to the earlier candidate. The settings are
validated on a head trained with every expert at once; a library build uses them for its extended head too
(the last expert's row trained against frozen older rows), which this does not score separately.
"""

from __future__ import annotations

from dataclasses import replace

from etr.models.decoder import DecoderLM
from etr.routing.train import TrainConfig, head_features, initial_rows, query_features, routing_stats, train_rows


def config_grid(base: TrainConfig, lrs: tuple[float, ...], weight_decays: tuple[float, ...],
                epochs: tuple[int, ...]) -> list[TrainConfig]:
    """Every combination, in the order given (the first of each axis first)."""
    return [replace(base, lr=lr, weight_decay=wd, epochs=ep, log=[]) for lr in lrs for wd in weight_decays
            for ep in epochs]


def choose_head_config(model: DecoderLM, rows: list[dict], experts: list[str], val_ids: list[list[int]],
                       val_experts: list[str | None], grid: list[TrainConfig]) -> tuple[TrainConfig, list[dict]]:
    """The candidate of ``grid`` whose head scores best on the validation questions ``val_ids`` (the expert
    each should route to, None for the meta), and one row per candidate: its settings and validation figures."""
    if not grid:
        raise ValueError("no candidate settings to choose from")
    order = sorted(experts)
    features, _ = head_features(model, rows, order, order)
    val = query_features(model, val_ids, [order.index(e) if e else ("token", None) for e in val_experts])
    table = []
    for cfg in grid:
        stats = routing_stats(val, train_rows(features, initial_rows(model, len(order)), None, cfg))
        score = (stats["routing_accuracy"] or 0.0) - (stats["false_routing"] or 0.0)
        table.append({"lr": cfg.lr, "weight_decay": cfg.weight_decay, "epochs": cfg.epochs, **stats, "score": score})
    best = max(range(len(grid)), key=lambda i: (table[i]["score"], -i))
    table[best]["chosen"] = True
    return replace(grid[best], log=[]), table
