"""SmolExpert results: the bars (the default profile's from the issue; the quick profile's only that the
experts learned what they were taught) and the markdown report."""

from __future__ import annotations

from etr.engine.config import META
from etr.routing import report
from etr.routing.evaluate import routing_accuracy
from etr.routing.library import query_set_lines


def _mean(method: dict, experts: list[str]) -> float:
    return sum(method["domain_accuracy"][e] for e in experts) / len(experts)


def _routing(method: dict, experts: list[str]) -> float:
    return routing_accuracy(method["confusion"], {e: e for e in experts}, experts)


def bars(summary: dict, seen: dict, experts: list[str], profile: str) -> list[dict]:
    """Each bar with its measured value and whether it holds."""
    seen_gain = _mean(seen["oracle"], experts) - _mean(seen[META], experts)
    checks = [("the experts beat the meta on questions they were trained on", seen_gain, seen_gain > 0)]
    if profile != "quick":
        meta, oracle = summary[META], summary["oracle"]
        gaps = [oracle["domain_accuracy"][e] - meta["domain_accuracy"][e] for e in experts]
        acc = {m: _mean(summary[m], experts) for m in summary}
        etr, ext = _routing(summary["etr"], experts), _routing(summary["etr_extended"], experts)
        false = summary["etr"]["false_routing"]
        checks += [
            ("every expert beats the meta on its domain's test questions by >= 30 points", min(gaps), min(gaps) >= 0.30),
            ("ETR routing accuracy >= 90% (unseen facts, unseen phrasings)", etr, etr >= 0.90),
            ("ETR accuracy within 5 points of the oracle", acc["oracle"] - acc["etr"], acc["oracle"] - acc["etr"] <= 0.05),
            ("ETR accuracy >= 20 points above the meta", acc["etr"] - acc[META], acc["etr"] - acc[META] >= 0.20),
            ("false routing on the general domain <= 5%", false, false <= 0.05),
            ("extension (the last domain added with its row only) loses <= 2 points of routing", etr - ext,
             etr - ext <= 0.02),
        ]
    return [{"bar": b, "value": round(v, 4), "holds": bool(ok)} for b, v, ok in checks]


def markdown(results: dict, experts: list[str]) -> str:
    """The build's report: accuracy and routing per method, the query sets, the bars, ETR's routing."""
    s, seen = results["summary"], results["seen"]
    lines = [f"# SmolExpert ({results['profile']} profile, seed {results['seed']})", "",
             f"Meta: SmolLM2-135M-Instruct ({results['meta']}), not trained. Build time "
             f"{results['timings_s']['total']:.0f} s: " +
             ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items() if k != "total"), "",
             "Experts: " + ", ".join(f"{e} {results['expert_steps'][e]} steps (final loss {results['expert_loss'][e]:.3f})"
                                     for e in experts) + ".", "",
             "## Test questions: facts the expert tokens never saw, in phrasings no training used", ""]
    lines += ["| method | " + " | ".join(experts) + " | mean | routing | false routing (general) |",
              "|---" * (len(experts) + 4) + "|"]
    for m, row in s.items():
        routed = m in ("oracle", "router", "etr", "etr_extended", "random")
        cells = [report.pct(row["domain_accuracy"][e]) for e in experts]
        lines.append(f"| {m} | {' | '.join(cells)} | {report.pct(_mean(row, experts))} | "
                     f"{report.pct(_routing(row, experts)) if routed else '-'} | {report.pct(row['false_routing'])} |")
    lines += ["", "Seen questions (trained facts and phrasings): meta " + report.pct(_mean(seen[META], experts)) +
              ", experts " + report.pct(_mean(seen["oracle"], experts)) + ".", "",
              *query_set_lines(results), *validation_lines(results["validation"]),
              *validation_lines(results.get("extension_validation") or [],
                                f"{experts[-1]}'s row added later to the other experts' frozen rows")]
    lines += ["", "## Bars", "", "| bar | value | holds |", "|---|---|---|"]
    lines += [f"| {b['bar']} | {b['value']:.3f} | {'yes' if b['holds'] else 'NO'} |" for b in results["bars"]]
    lines += ["", "## Routing of ETR (rows: domain, columns: model that answered)", ""]
    lines += report.confusion_table(s["etr"]["confusion"])
    return "\n".join(lines) + "\n"


def validation_lines(table: list[dict], what: str = "Expert tokens") -> list[str]:
    """The candidate settings of the expert tokens (or of ``what``), each scored on the validation split by
    the first generated position's decision: routing accuracy on domain questions, false routing on general
    requests, and what chooses: the score (``validation.margin_score``), its standard error and how far the
    rows moved, and the band (``validation.one_se_choice``)."""
    if not table:
        return []
    lines = ["", f"## {what}: settings chosen on the validation split", "",
             "Score: mean log sigmoid of the right decision's margin over the best wrong one, domain questions "
             "plus general requests (0 is best). Chosen: of the scores within a band below the best (its standard "
             "error, never less than log 2 / n, n the larger part of the split), the rows that moved least."
             + (f" Band: {chosen[0]['band']:.4f}." if (chosen := [r for r in table if 'band' in r]) else ""), "",
             "| lr | weight decay | epochs | routing | false routing | score | s.e. | moved | chosen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['lr']:g} | {r['weight_decay']:g} | {r['epochs']} | {report.pct(r['routing_accuracy'])} | "
                     f"{report.pct(r['false_routing'])} | {r['score']:.4f} | {r.get('score_se', 0):.4f} | "
                     f"{r.get('moved', float('nan')):.2f} | {'yes' if r.get('chosen') else ''} |")
    return lines
