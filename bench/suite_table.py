"""The GPU suite's summary table (bench/gpu_suite.py): one line per measured figure, the issue's bar beside it."""

from __future__ import annotations


def table(r: dict) -> str:
    """The short summary: one line per measured figure, with the issue's bar beside it."""
    spent = sum(r.get("seconds", {}).values())
    lines = [f"{r['device']}, {r['date']}, copy bandwidth {r['copy_GBps']:.0f} GB/s, steps took {spent:.0f} s",
             r.get("versions", ""), "",
             f"{'what':<44}{'measured':>22}  bar"]

    def add(what, measured, bar=""):
        lines.append(f"{what:<44}{measured:>22}  {bar}")
    for name in ("tests", "lm_head", "attention", "prefill", "decode", "switch"):
        v = r.get(name)
        if v is None:
            continue
        if isinstance(v, dict) and "error" in v:
            add(name, "ERROR", v["error"][:60])
        elif name == "tests":
            add("GPU tests", v["summary"][:22], "all pass")
            for line in v.get("failed", [])[:8]:
                add("  " + line.split(" - ")[0][-42:], "", line.partition(" - ")[2][:60])
        elif name == "lm_head":
            for x in v:
                add(f"extended head B={x['B']} (torch {x['torch_ms']:.3f} ms)",
                    f"{x['kernel_ms']:.3f} ms {100 * x['frac_bw']:.0f}%bw", "<= 0.46 ms, argmax equal: "
                    + str(x["argmax_equal"]))
        elif name == "attention":
            for x in v:
                add(f"paged decode ctx={x['context']} (SDPA {x['sdpa_ms']:.3f} ms)",
                    f"{x['paged_ms']:.3f} ms {x['GBps']:.0f} GB/s")
        elif name == "prefill":
            add(f"prefill {v['new']} new after {v['prefix']} cached, b={v['batch']}",
                f"{v['triton_ms']:.3f} ms", f"gather+SDPA {v['gather_sdpa_ms']:.3f} ms, err {v['max_abs_err']:.3f}")
        elif name == "decode":
            for x in v:
                bar = {("qwen2-7b", 1): "<= 6.3 ms", ("qwen2-1.5b", 1): "<= 1.8 ms"}.get((x["shape"], x["batch"]), "")
                add(f"decode {x['shape']} {x.get('backend', '')} b={x['batch']} (HF {x['hf_ms_per_step']:.2f})",
                    f"{x['etr_ms_per_step']:.2f} ms {x.get('tok_s', 0):.0f} t/s x{x['speedup']:.2f}",
                    f"{bar} floor {x['floor_ms']:.2f} ms; >= 1.5x (b=1) / 3x (b=32)")
        elif name == "switch":
            add(f"switch overhead, {v.get('shape', '?')}, {v['new_tokens']} tokens",
                f"{v['overhead_pct']:+.2f}%", f"< 1%; expert prefill {v['expert_prefill_s_per_query'] * 1e3:.1f} ms, "
                f"pairs median {v.get('paired_median_pct', float('nan')):+.2f}%")
    return "\n".join(lines)
