"""MiniExpert results: the bars of the default profile and the markdown report."""

from __future__ import annotations

from etr.routing import report
from etr.routing.evaluate import routing_accuracy
from etr.routing.library import query_set_lines


def _expert_mean(method: dict, experts: list[str], key: str = "domain_accuracy") -> float:
    return sum(method[key][e] for e in experts) / len(experts)


def _routing(method: dict, experts: list[str]) -> float:
    """Routing accuracy (evaluate.routing_accuracy) over these expert domains; each domain's expert has its name."""
    return routing_accuracy(method["confusion"], {e: e for e in experts}, experts)


def bars(summary: dict, experts: list[str], profile: str = "default") -> list[dict]:
    """The profile's bars, each with the measured value and whether it holds. The default profile's are the
    issue's; the quick one (a minute's training, for CI) asks the experts' gain over the meta on average over
    their domains rather than in each: 250 steps do not teach every skill on every seed."""
    meta, oracle, etr, ext = (summary[m] for m in ("meta", "oracle", "etr", "etr_extended"))
    gaps = {e: oracle["domain_accuracy"][e] - meta["domain_accuracy"][e] for e in experts}
    acc = {m: _expert_mean(summary[m], experts) for m in summary}
    routing = {m: _routing(summary[m], experts) for m in ("router", "etr", "etr_extended")}
    gain = ("every expert beats the meta in its domain by >= 30 points", min(gaps.values()),
            min(gaps.values()) >= 0.30)
    if profile == "quick":
        mean_gap = sum(gaps.values()) / len(gaps)
        gain = ("the experts beat the meta by >= 30 points on average over their domains", mean_gap, mean_gap >= 0.30)
    checks = [
        gain,
        ("ETR routing accuracy >= 90%", routing["etr"], routing["etr"] >= 0.90),
        ("ETR accuracy within 5 points of the oracle", acc["oracle"] - acc["etr"], acc["oracle"] - acc["etr"] <= 0.05),
        ("ETR accuracy >= 20 points above the meta", acc["etr"] - acc["meta"], acc["etr"] - acc["meta"] >= 0.20),
        ("extension (3 + 2 experts) loses <= 2 points of routing accuracy", routing["etr"] - routing["etr_extended"],
         routing["etr"] - routing["etr_extended"] <= 0.02),
    ]
    return [{"bar": b, "value": round(v, 4), "holds": bool(ok)} for b, v, ok in checks]


def markdown(results: dict, experts: list[str]) -> str:
    """The build's report: accuracy tables, query-set purity, the bars and ETR's routing."""
    s = results["summary"]
    lines = [f"# MiniExpert ({results['profile']} profile, seed {results['seed']})", "",
             f"Build time {results['timings_s']['total']:.0f} s: " +
             ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items() if k != "total"), "",
             "## Accuracy (%) on held-out questions; routing accuracy over the expert domains", ""]
    lines += report.accuracy_table(s, ("random", "router", "etr", "etr_extended"))
    skills, facts = results["skill_domains"], results["fact_domains"]
    lines += ["", "| method | mean over expert domains | routing acc. | on skills | on facts | at the first token "
              "| late switches |", "|---|---|---|---|---|---|---|"]
    for m in s:
        routed = m in ("oracle", "router", "etr", "etr_extended")
        cells = [f"{100 * _routing(s[m], d):.1f}" if routed else "-" for d in (experts, skills, facts)]
        start = f"{100 * s[m]['routing_accuracy_at_start']:.1f}" if routed else "-"
        lines.append(f"| {m} | {100 * _expert_mean(s[m], experts):.1f} | {' | '.join(cells)} | {start} | "
                     f"{s[m]['late_switches']} |")
    lines += ["", "Routing is measured on held-out questions: skill questions no training or collection draw "
              "contains, and fact questions about facts no collection query asks about (the expert tokens and "
              "the router train on the collection; the experts themselves know every fact)."]
    lines += [""] + query_set_lines(results)
    lines += ["", "## Bars", "", "| bar | value | holds |", "|---|---|---|"]
    lines += [f"| {b['bar']} | {b['value']:.3f} | {'yes' if b['holds'] else 'NO'} |" for b in results["bars"]]
    lines += ["", "## Routing of ETR (rows: domain, columns: model that answered)", ""]
    lines += report.confusion_table(s["etr"]["confusion"])
    return "\n".join(lines) + "\n"
