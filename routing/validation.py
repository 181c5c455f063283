"""Choosing the expert tokens' training settings on a validation split, never on the test set.

Each candidate ``TrainConfig`` trains the rows of every expert on the same cached features of the query sets;
the validation questions (entities of their own; the domain questions in a phrasing of their own, the general
requests in every phrasing but the test one) are scored by the decision greedy decoding makes at
the first generated position: a domain's question should pick its expert's row, a general request no expert
row. The score is by margin, not by count: per question, ``log sigmoid(m)`` of the margin ``m`` by which the
right decision's logit leads the best wrong one, averaged over the domain questions and over the general
requests, the two averages summed (0 is the best score). Counts tie on a split of this size, where several
candidates route every validation question right and still differ on an unseen phrasing; a margin also says how
near a candidate comes to routing wrong. Margins grow with the rows' norm, so the scores of well-fitted
candidates crowd against 0 and their order there is noise; hence a rule in the manner of the one-standard-error
rule of choosing a model by cross-validation: of the candidates whose score is within a band below the best
candidate's score, the one whose rows moved least from where training started (Frobenius norm) is chosen, the
most regularized head the split cannot tell from the best. The band is the best score's standard error, but never
narrower than ``log 2 / n`` with ``n`` the larger part's size: the least one decision at an even margin (one
question the split cannot settle) costs the score. Without that floor a candidate whose every margin is wide
enough to round ``log sigmoid`` to 0 has a standard error of 0 and no band at all, and the rows that moved most
win exactly where the split can tell nothing (SmolExpert seed 2, bench/RESULTS.md). Ties go to the earlier
candidate. A head trained with every expert at once is scored by ``choose_head_config``; an extended head (new
rows trained against the frozen rows of an older head) by ``choose_extension_config``, since the new rows alone
decide whether general requests now go to the new expert.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from etr.models.decoder import DecoderLM
from etr.routing.train import (TrainConfig, decision_margins, head_features, initial_rows, query_features,
                               routing_stats, train_rows)


def config_grid(base: TrainConfig, lrs: tuple[float, ...], weight_decays: tuple[float, ...],
                epochs: tuple[int, ...]) -> list[TrainConfig]:
    """Every combination, in the order given (the first of each axis first)."""
    return [replace(base, lr=lr, weight_decay=wd, epochs=ep, log=[]) for lr in lrs for wd in weight_decays
            for ep in epochs]


def choose_head_config(model: DecoderLM, rows: list[dict], experts: list[str], val_ids: list[list[int]],
                       val_experts: list[str | None], grid: list[TrainConfig]) -> tuple[TrainConfig, list[dict]]:
    """The candidate of ``grid`` whose head scores best on the validation questions ``val_ids`` (the expert
    each should route to, None for the meta), and one row per candidate: its settings and validation figures."""
    order = sorted(experts)
    features, _ = head_features(model, rows, order, order)
    start = initial_rows(model, len(order))
    return _choose(grid, _val_features(model, order, val_ids, val_experts), start,
                   lambda cfg: train_rows(features, start.clone(), None, cfg))


def choose_extension_config(model: DecoderLM, rows: list[dict], base: list[str], added: list[str],
                            base_cfg: TrainConfig, val_ids: list[list[int]], val_experts: list[str | None],
                            grid: list[TrainConfig]) -> tuple[TrainConfig, list[dict]]:
    """The candidate of ``grid`` for the rows of ``added`` trained against the frozen rows of ``base`` (trained
    with ``base_cfg``), as ``library.write_heads`` builds an extended head, scored by that extended head on the
    validation questions of every expert and the general requests; and one row per candidate."""
    base_order, new_order = sorted(base), sorted(added)
    order = base_order + new_order
    # The base rows are trained here as write_heads trains them (same rows, settings and seed): cheap next to the
    # features, and it keeps the choice independent of the files a build writes.
    base_features, _ = head_features(model, rows, base_order, base_order)
    frozen = train_rows(base_features, initial_rows(model, len(base_order)), None, replace(base_cfg, log=[]))
    features, _ = head_features(model, rows, order, new_order)

    start = initial_rows(model, len(new_order))

    def extended(cfg: TrainConfig) -> torch.Tensor:
        return torch.cat([frozen, train_rows(features, start.clone(), frozen, cfg)])
    return _choose(grid, _val_features(model, order, val_ids, val_experts), torch.cat([frozen, start]), extended)


def _val_features(model: DecoderLM, order: list[str], val_ids: list[list[int]], val_experts: list[str | None]):
    return query_features(model, val_ids, [order.index(e) if e else ("token", None) for e in val_experts])


def _choose(grid: list[TrainConfig], val, start: torch.Tensor, head_rows) -> tuple[TrainConfig, list[dict]]:
    """Score ``head_rows(cfg)`` (rows that training moved from ``start``) on ``val`` for every candidate and
    choose the least-moved candidate within the band below the best score (module docstring)."""
    if not grid:
        raise ValueError("no candidate settings to choose from")
    table = []
    for cfg in grid:
        rows = head_rows(cfg)
        score, error = margin_score(val, rows)
        if not math.isfinite(score):
            raise ValueError(f"candidate lr {cfg.lr}, weight decay {cfg.weight_decay}, {cfg.epochs} epochs scored "
                             f"{score} on the validation split (its rows diverged?)")
        table.append({"lr": cfg.lr, "weight_decay": cfg.weight_decay, "epochs": cfg.epochs,
                      **routing_stats(val, rows), "score": score, "score_se": error,
                      "moved": (rows.float() - start.float()).norm().item()})
    floor = decision_floor(val)
    chosen = one_se_choice(table, floor)
    table[chosen] |= {"chosen": True, "band": band(table, floor)[1]}
    return replace(grid[chosen], log=[]), table


def decision_floor(val) -> float:
    """``log 2 / n``, ``n`` the larger of the split's two parts (domain questions, general requests): what one
    decision at a margin of 0 costs ``margin_score``."""
    pos = int((val.target_expert >= 0).sum())
    return math.log(2) / max(pos, len(val.target_expert) - pos, 1)


def one_se_choice(table: list[dict], floor: float = 0.0) -> int:
    """Index of the entry with the least ``moved`` among those whose ``score`` is within the band below the best
    entry's: its ``score_se``, or ``floor`` where that is wider (the earlier entry on a tie)."""
    best, width = band(table, floor)
    near = [i for i, r in enumerate(table) if r["score"] >= table[best]["score"] - width]
    return min(near, key=lambda i: (table[i]["moved"], i))


def band(table: list[dict], floor: float = 0.0) -> tuple[int, float]:
    """The best entry (the earlier on a tie) and the band's width below its score: its ``score_se`` or ``floor``,
    whichever is wider."""
    best = max(range(len(table)), key=lambda i: (table[i]["score"], -i))
    return best, max(table[best]["score_se"], floor)


def margin_score(val, rows: torch.Tensor) -> tuple[float, float]:
    """Mean ``log sigmoid(margin)`` over the domain questions plus the same over the general requests (either
    left out when the split has none), at most 0 and near 0 when every decision is right by a wide margin; and
    its standard error (the two means' errors combined)."""
    if not len(val.target_expert):
        raise ValueError("no validation questions to score the candidates on")
    fit = torch.nn.functional.logsigmoid(decision_margins(val, rows).double())
    pos = val.target_expert >= 0
    parts = [fit[part] for part in (pos, ~pos) if part.any()]
    variance = sum(p.var().item() / len(p) if len(p) > 1 else 0.0 for p in parts)
    return sum(p.mean().item() for p in parts), variance ** 0.5
