"""MiniExpert results: the bars of the default profile and the markdown report."""

from __future__ import annotations

from etr.routing import report


def _expert_mean(method: dict, experts: list[str], key: str = "domain_accuracy") -> float:
    return sum(method[key][e] for e in experts) / len(experts)


def _routing(method: dict, experts: list[str]) -> float:
    """Routing accuracy over the expert domains' questions (the general domain is false routing)."""
    hits = sum(method["confusion"][e].get(e, 0) for e in experts)
    return hits / sum(sum(method["confusion"][e].values()) for e in experts)


def bars(summary: dict, experts: list[str]) -> list[dict]:
    """The issue's bars, each with the measured value and whether it holds."""
    meta, oracle, etr, ext = (summary[m] for m in ("meta", "oracle", "etr", "etr_extended"))
    gaps = {e: oracle["domain_accuracy"][e] - meta["domain_accuracy"][e] for e in experts}
    acc = {m: _expert_mean(summary[m], experts) for m in summary}
    routing = {m: _routing(summary[m], experts) for m in ("router", "etr", "etr_extended")}
    checks = [
        ("every expert beats the meta in its domain by >= 30 points", min(gaps.values()), min(gaps.values()) >= 0.30),
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
    lines += ["", "| method | mean over expert domains | routing acc. (expert domains) |", "|---|---|---|"]
    for m in s:
        routing = f"{100 * _routing(s[m], experts):.1f}" if m in ("oracle", "router", "etr", "etr_extended") else "-"
        lines.append(f"| {m} | {100 * _expert_mean(s[m], experts):.1f} | {routing} |")
    lines += ["", "## Query sets (Eq. 3, loss gap > tau, ties to the largest gap)", "",
              "| expert | pairs | share from its own domain |", "|---|---|---|"]
    for e, n in results["set_sizes"].items():
        purity = results["set_purity"].get(e)
        lines.append(f"| {e} | {n} | {'-' if purity is None else f'{100 * purity:.1f}%'} |")
    lines += ["", "## Bars", "", "| bar | value | holds |", "|---|---|---|"]
    lines += [f"| {b['bar']} | {b['value']:.3f} | {'yes' if b['holds'] else 'NO'} |" for b in results["bars"]]
    lines += ["", "## Routing of ETR (rows: domain, columns: model that answered)", ""]
    lines += report.confusion_table(s["etr"]["confusion"])
    return "\n".join(lines) + "\n"
