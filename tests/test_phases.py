"""The engine's phases are named spans in a profiler trace (a switch visible at a glance), summed by
``phase_totals``; ``etr bench decode --profile`` writes such a trace and prints the totals."""

import json

import torch
from torch.profiler import ProfilerActivity, profile

from conftest import make_tiny_checkpoint
from etr import LLM, SamplingParams
from etr.engine.phases import PREFIX, phase, phase_totals
from test_routing import LLAMA, meta_trace, switch_row, write_head


def test_a_switch_shows_as_named_phases(tmp_path):
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=21, **LLAMA)
    expert = make_tiny_checkpoint(tmp_path / "astro", "llama", seed=22, **LLAMA)
    prompt = [5, 6, 7, 8]
    _, hidden, mask = meta_trace(meta, prompt, 8)
    head = write_head(tmp_path / "head.safetensors", ["astro"], [switch_row(hidden, mask, 2)])
    llm = LLM(str(meta), dtype="float32", num_kv_blocks=32, experts={"astro": str(expert)}, expert_head=str(head))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert (out.expert, out.switch_index) == ("astro", 2)
    totals = {name: calls for name, calls, _ in phase_totals(prof)}
    # The meta prefills and decodes up to the switch; the expert prefills the context once and decodes the rest.
    assert totals["meta prefill"] == 1 and totals["hand-over"] >= 1 and totals["expert astro prefill"] == 1
    assert totals["expert astro decode"] == len(out.token_ids) - out.switch_index - 1
    assert totals["sampling"] == totals["meta prefill"] + totals.get("meta decode", 0) + 1 + totals["expert astro decode"]
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {PREFIX + "expert astro prefill", PREFIX + "hand-over"} <= names


def test_a_phase_outside_a_profiler_is_the_shared_no_op():
    from etr.engine import phases
    assert phase("idle") is phases._OFF
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        span = phase("busy")
        with span:
            torch.ones(2).sum()
    assert span is not phases._OFF and [n for n, _, _ in phase_totals(prof)] == ["busy"]


def test_etr_bench_decode_profile(tmp_path, capfd):
    from etr.cli import main
    model = make_tiny_checkpoint(tmp_path / "m", "llama", seed=3, **LLAMA)
    trace = tmp_path / "decode.json"
    assert main(["bench", "decode", "--model", str(model), "--dtype", "float32", "--batch", "3", "--steps", "4",
                 "--profile", str(trace)]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e.get("name") == PREFIX + "meta decode" for e in events) == 4
    printed = capfd.readouterr().out
    assert "batch 3, context 32" in printed and "Self CPU" in printed
    assert any(line.split()[:3] == ["meta", "decode", "4"] for line in printed.splitlines())
