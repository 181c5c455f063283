"""Eq. 4 on cached features equals the full forward through the extended head (loss and gradients)."""

import math
import types
from dataclasses import replace

import pytest
import torch

from etr.engine.attention import TorchAttentionBackend, causal_metadata
from etr.models import load_model
from etr.routing.train import TrainConfig, cached_loss, query_features, routing_stats, train_rows


def full_forward_loss(model, queries, targets, w_expert):
    """The reference: a forward through the frozen meta and cross-entropy over [W_V; W_E] h."""
    losses = []
    for q, t in zip(queries, targets):
        h = model(torch.tensor(q), torch.arange(len(q)), causal_metadata([len(q)], "cpu"), None,
                  TorchAttentionBackend())[-1]
        logits = torch.cat([model.lm_head_weight, w_expert]) @ h
        if isinstance(t, tuple):  # a negative: a given token, or (None) the meta's own greedy token
            target = int((model.lm_head_weight @ h).argmax()) if t[1] is None else t[1]
        else:
            target = model.config.vocab_size + t
        losses.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([target])))
    return torch.stack(losses).mean()


def test_cached_features_equal_full_forward(tiny_dir):
    model = load_model(tiny_dir("qwen2_untied"), torch.float32, "cpu", 64)
    queries = [[1, 2, 3], [9] * 12, [200, 5], [7, 7, 8, 9, 10], [4, 40, 44]]
    targets = [0, 2, ("token", 17), 1, ("token", None)]  # expert rows and negatives (given / meta's own token)
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 0.3
    f = query_features(model, queries, targets, batch_size=3)
    w_cached, w_full = w.clone().requires_grad_(), w.clone().requires_grad_()
    cached = cached_loss(f, w_cached)
    cached.backward()
    full = full_forward_loss(model, queries, targets, w_full)
    full.backward()
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_cached.grad, w_full.grad, atol=1e-5, rtol=1e-4)


def test_training_teaches_routing_and_extension_keeps_old_rows(tiny_dir):
    model = load_model(tiny_dir("qwen2_untied"), torch.float32, "cpu", 64)
    g = torch.Generator().manual_seed(1)
    queries = [torch.randint(0, 256, (6,), generator=g).tolist() for _ in range(24)]
    targets = [i % 3 for i in range(24)]
    f = query_features(model, queries, targets)
    init = model.lm_head_weight.mean(0, keepdim=True).repeat(3, 1)  # the paper's initialisation
    cfg = TrainConfig(lr=5e-2, epochs=30, weight_decay=0.0)
    rows = train_rows(f, init, cfg=cfg)
    assert cfg.log[-1]["loss"] < cfg.log[0]["loss"] / 2
    chosen = (torch.cat([model.lm_head_weight, rows]) @ f.hidden.T).argmax(0) - model.config.vocab_size
    assert (chosen == f.target_expert).float().mean() > 0.9
    # Extension: the first two rows frozen, one new row trained against them.
    new = train_rows(f, init[:1], frozen=rows[:2], cfg=TrainConfig(lr=5e-2, epochs=5, weight_decay=0.0))
    assert new.shape == (1, 64) and not torch.equal(new, init[:1])


def test_negatives_teach_when_not_to_route(tiny_dir):
    """Rows trained with negatives keep the meta's own token on those queries; without them every query routes."""
    model = load_model(tiny_dir("qwen2_untied"), torch.float32, "cpu", 64)
    g = torch.Generator().manual_seed(2)
    queries = [torch.randint(0, 256, (5,), generator=g).tolist() for _ in range(40)]
    targets = [i % 2 if i < 20 else ("token", None) for i in range(40)]
    f = query_features(model, queries, targets)
    init = model.lm_head_weight.mean(0, keepdim=True).repeat(2, 1)
    positives = f.subset(torch.arange(20))
    only_pos = train_rows(positives, init, cfg=TrainConfig(lr=5e-2, epochs=40, weight_decay=0.0))
    with_neg = train_rows(f, init, cfg=TrainConfig(lr=5e-2, epochs=150, weight_decay=0.0))
    assert routing_stats(f, only_pos)["false_routing"] > 0.5
    stats = routing_stats(f, with_neg)
    assert stats["false_routing"] < 0.2 and stats["routing_accuracy"] > 0.8
    assert stats["positives"] == 20 and stats["negatives"] == 20


def test_train_cost_bench_runs_all_three_methods(tiny_dir, tmp_path, capsys):
    """bench/train_cost.py at toy size: the cached method, the frozen-forward alternative and the paper's
    method all train, from the same rows and batches, to about the same loss."""
    import json
    from conftest import load_bench
    load_bench("train_cost").main(["--model", str(tiny_dir("llama_tied_gqa")), "--queries", "16", "--experts", "2",
                                   "--epochs", "2", "--json", str(tmp_path / "cost.json")])
    result = json.loads((tmp_path / "cost.json").read_text())
    losses = [result[m]["final_loss"] for m in ("cached", "frozen", "reference")]
    assert max(losses) - min(losses) < 1e-3 and result["frozen_ratio"] > 0 and result["ratio"] > 0
    assert "over the frozen forward" in capsys.readouterr().out


def test_settings_chosen_on_validation_questions(tiny_dir):
    """The grid's candidate that routes the validation questions best is chosen (one that never trains routes
    none of them), every candidate is reported, and equal scores go to the earlier candidate. A tiny random
    model does not generalize across queries, so the validation questions here are the training ones: this
    tests the choice, not generalization."""
    from etr.routing.validation import choose_head_config, config_grid
    model = load_model(tiny_dir("qwen2_untied"), torch.float32, "cpu", 64)
    g = torch.Generator().manual_seed(1)

    def queries(low: int) -> list[list[int]]:
        return [torch.randint(low, low + 40, (5,), generator=g).tolist() for _ in range(12)]
    rows = ([{"expert": "a", "query_ids": q} for q in queries(40)] +
            [{"expert": "b", "query_ids": q} for q in queries(100)] +
            [{"expert": None, "query_ids": q} for q in queries(160)])
    val, val_experts = [r["query_ids"] for r in rows], [r["expert"] for r in rows]
    grid = config_grid(TrainConfig(weight_decay=0.0), (0.0, 0.2), (0.0,), (60,))
    chosen, table = choose_head_config(model, rows, ["b", "a"], val, val_experts, grid)
    assert [r["lr"] for r in table] == [0.0, 0.2] and chosen.lr == 0.2 and table[1].get("chosen")
    assert table[0]["routing_accuracy"] == 0.0 and table[0]["false_routing"] == 0.0
    assert table[1]["routing_accuracy"] >= 0.9 and table[1]["false_routing"] <= 0.1
    assert table[0]["score"] < table[1]["score"] < 0
    tie = config_grid(TrainConfig(), (0.0,), (0.1, 1.0), (1,))
    chosen, table = choose_head_config(model, rows, ["a", "b"], val, val_experts, tie)
    assert chosen.weight_decay == 0.1 and table[0].get("chosen") and not table[1].get("chosen")


def test_margin_score_counts_how_far_each_decision_is_from_wrong():
    """Margins by hand: two rows, three queries (row 0's, row 1's, the meta's). The score is log sigmoid of the
    margin averaged over the domain questions plus the same over the general requests; a margin is positive
    exactly where greedy decoding decides right; nearer misses score lower though the counts do not change."""
    from etr.routing.train import Features, decision_margins, routed_rows
    from etr.routing.validation import margin_score
    hidden = torch.eye(3)
    val = Features(hidden, torch.zeros(3), torch.tensor([0, 1, -1]), torch.zeros(3), torch.tensor([1.0, 1.0, 1.0]))
    rows = torch.tensor([[3.0, 0.0, 0.5], [2.5, 0.5, 0.0]])  # scores: q0 (3, 2.5 | 1), q1 (0, .5 | 1), q2 (.5, 0 | 1)
    margins = decision_margins(val, rows)
    assert margins.tolist() == pytest.approx([0.5, -0.5, 0.5])
    assert ((margins > 0) == (routed_rows(val, rows) == val.target_expert)).all()
    ls = torch.nn.functional.logsigmoid
    assert margin_score(val, rows)[0] == pytest.approx(((ls(torch.tensor(0.5)) + ls(torch.tensor(-0.5))) / 2
                                                     + ls(torch.tensor(0.5))).item())
    wider = torch.tensor([[5.0, 0.0, -2.0], [2.5, 0.5, 0.0]])
    assert routed_rows(val, wider).tolist() == routed_rows(val, rows).tolist()
    assert margin_score(val, wider)[0] > margin_score(val, rows)[0]
    domain_only = val.subset(torch.tensor([0, 1]))
    assert margin_score(domain_only, rows)[0] == pytest.approx(((ls(torch.tensor(0.5)) + ls(torch.tensor(-0.5))) / 2).item())
    assert margin_score(val.subset(torch.tensor([2])), rows) == ( pytest.approx(ls(torch.tensor(0.5)).item()), 0.0)
    fits = ls(torch.tensor([0.5, -0.5])).double()
    assert margin_score(val, rows)[1] == pytest.approx((fits.var() / 2).sqrt().item())  # one general request: no spread
    tied = torch.tensor([[3.0, 0.0, 1.0], [3.0, 0.5, 0.0]])  # q0: its row level with row 1; q2: row 0 with the meta
    assert decision_margins(val, tied)[[0, 2]].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="no validation questions"):
        margin_score(val.subset(torch.tensor([], dtype=torch.long)), rows)


def test_one_standard_error_rule():
    """Of the candidates within one standard error of the best score, the one whose rows moved least wins; one
    outside that band loses however little it moved; equal candidates go to the earlier."""
    from etr.routing.validation import one_se_choice
    table = [{"score": -0.010, "score_se": 0.020, "moved": 9.0}, {"score": -0.025, "score_se": 0.001, "moved": 4.0},
             {"score": -0.050, "score_se": 0.001, "moved": 1.0}, {"score": -0.030, "score_se": 0.0, "moved": 3.0}]
    assert one_se_choice(table) == 3
    table[0]["score_se"] = 0.016  # -0.026: only the best and the second stay in the band
    assert one_se_choice(table) == 1
    table[0]["score_se"] = 0.0
    assert one_se_choice(table) == 0
    assert one_se_choice([{"score": 0.0, "score_se": 0.0, "moved": 1.0}] * 2) == 0


def test_band_has_a_floor_where_the_best_score_saturates():
    """A best score of exactly 0 with a standard error of 0 (every margin wide enough to round log sigmoid to
    0) still leaves a band of ``log 2 / n``: the least-moved candidate within it wins, one outside it loses."""
    from etr.routing.validation import band, decision_floor, one_se_choice
    table = [{"score": 0.0, "score_se": 0.0, "moved": 11.4}, {"score": -7e-6, "score_se": 1e-6, "moved": 6.8},
             {"score": -0.02, "score_se": 0.01, "moved": 1.0}]
    assert one_se_choice(table) == 0
    assert one_se_choice(table, 0.004) == 1
    assert band(table, 0.004) == (0, 0.004)
    table[0]["score_se"] = 0.03  # a measured spread wider than the floor counts
    assert one_se_choice(table, 0.004) == 2 and band(table, 0.004) == (0, 0.03)
    val = types.SimpleNamespace(target_expert=torch.tensor([0, 1, -1, -1, -1, -1, -1, 0]))  # the larger part counts
    assert decision_floor(val) == pytest.approx(math.log(2) / 5)
    assert decision_floor(types.SimpleNamespace(target_expert=torch.tensor([2] * 5))) == pytest.approx(math.log(2) / 5)


def test_extension_settings_chosen_on_validation_questions(tiny_dir):
    """The added row's settings are scored by the extended head (the base rows trained with the base settings,
    frozen): a candidate that leaves the new row untrained routes only the base expert's questions; base rows
    that were never trained route none of them whatever the new row's settings."""
    from etr.routing.validation import choose_extension_config, config_grid
    model = load_model(tiny_dir("qwen2_untied"), torch.float32, "cpu", 64)
    g = torch.Generator().manual_seed(1)

    def queries(low: int) -> list[list[int]]:
        return [torch.randint(low, low + 40, (5,), generator=g).tolist() for _ in range(12)]
    rows = ([{"expert": "a", "query_ids": q} for q in queries(40)] +
            [{"expert": "b", "query_ids": q} for q in queries(100)] +
            [{"expert": None, "query_ids": q} for q in queries(160)])
    val, val_experts = [r["query_ids"] for r in rows], [r["expert"] for r in rows]
    grid = config_grid(TrainConfig(weight_decay=0.0), (0.0, 0.2), (0.0,), (60,))
    trained = replace(grid[1], log=[])
    chosen, table = choose_extension_config(model, rows, ["a"], ["b"], trained, val, val_experts, grid)
    assert chosen.lr == 0.2 and table[1].get("chosen") and not table[0].get("chosen")
    assert table[0]["routing_accuracy"] == pytest.approx(0.5, abs=0.05)  # a's 12 of 24, by the frozen row
    assert table[1]["routing_accuracy"] >= 0.75 and table[1]["false_routing"] <= 0.1  # 0.83 with this seed
    _, untrained_base = choose_extension_config(model, rows, ["a"], ["b"], grid[0], val, val_experts, grid)
    assert max(r["routing_accuracy"] for r in untrained_base) <= 0.55


def test_margin_score_does_not_round_wide_margins_to_zero(monkeypatch):
    """A margin of 120 logits makes float32 ``log sigmoid`` exactly 0; the score is taken in float64, so wider
    margins still score higher and a standard error stays measurable."""
    from etr.routing import validation
    assert torch.nn.functional.logsigmoid(torch.tensor(120.0)).item() == 0.0
    val = types.SimpleNamespace(target_expert=torch.tensor([0, 1, -1, -1]))
    margins = {"narrow": torch.tensor([120.0, 120.0, 120.0, 121.0]), "wide": torch.tensor([125.0, 125.0, 125.0, 130.0])}
    scores = {}
    for name, m in margins.items():
        monkeypatch.setattr(validation, "decision_margins", lambda f, rows, m=m: m)
        scores[name] = validation.margin_score(val, None)
    assert scores["narrow"][0] < scores["wide"][0] < 0 and scores["narrow"][1] > 0


def test_a_candidate_that_scores_nan_is_named(monkeypatch):
    """A candidate whose score is not finite (rows that diverged) stops the choice with its settings named,
    rather than being kept as the best or leaving no candidate in the band."""
    from etr.routing import validation
    monkeypatch.setattr(validation, "margin_score", lambda val, rows: (float("nan"), 0.0))
    monkeypatch.setattr(validation, "routing_stats", lambda val, rows: {})
    grid = validation.config_grid(TrainConfig(), (0.5,), (0.1,), (3,))
    with pytest.raises(ValueError, match="lr 0.5, weight decay 0.1, 3 epochs scored nan"):
        validation._choose(grid, None, torch.zeros(1, 2), lambda cfg: torch.ones(1, 2))
