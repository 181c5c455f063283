"""bench/scaling.py: the bytes a decode step must read, and a small sweep end to end (table, JSON, PNG)."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import load_bench, make_tiny_checkpoint
from etr.models.config import load_model_config


def test_step_bytes_counts_weights_once_and_every_context_token(tmp_path):
    scaling = load_bench("scaling")
    path = make_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=True)
    cfg = load_model_config(path)
    tied = torch.nn.Linear(4, 3)
    tied.extra = torch.nn.Linear(4, 3)
    tied.extra.weight = tied.weight  # shared: counted once
    assert scaling.weight_bytes(tied) == (12 + 3 + 3) * 4
    from etr.models.loader import load_model
    tied_lm = load_model(path, torch.float32, "cpu")
    assert scaling.weight_bytes(tied_lm) == sum(p.numel() * 4 for p in tied_lm.parameters())  # the head is read
    untied_path = make_tiny_checkpoint(tmp_path / "u", "llama", hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, tie_word_embeddings=False)
    untied = load_model(untied_path, torch.float32, "cpu")
    embed = untied.embed_tokens.weight.numel() * 4  # only a step's own rows of it are read
    assert scaling.weight_bytes(untied) == sum(p.numel() * 4 for p in untied.parameters()) - embed
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    assert scaling.step_bytes(cfg, 1000, 3, 50, 2) == 1000 + 3 * 50 * per_token
    # The GEMMs' matrices alone, counted from the config: no norm weight (1-d) counts toward the FLOPs.
    h, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    per_layer = h * (q + 2 * kv) + q * h + 2 * h * inter + inter * h
    assert scaling.matrix_params(tied_lm) == cfg.num_hidden_layers * per_layer + cfg.vocab_size * h
    assert scaling.matrix_params(tied_lm) < scaling.weight_bytes(tied_lm) / 4
    head = untied.lm_head.weight.numel()  # untied: the head is multiplied by, the embedding only indexed
    assert scaling.matrix_params(untied) == sum(p.numel() for p in untied.parameters() if p.dim() == 2) - embed // 4
    assert head == embed // 4 and scaling.matrix_params(untied) > head
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim  # scores + values, a position
    assert scaling.step_flops(cfg, 1000, 3, 50) == 3 * (2 * 1000 + 50 * attention)


def test_scaling_sweep_writes_table_json_and_plot(tmp_path, capsys):
    scaling = load_bench("scaling")
    path = make_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    # bf16: where the CPU has native bf16 the engine packs its linears for oneDNN, out of parameters().
    assert scaling.main(["--model", str(path), "--dtype", "bfloat16", "--batches", "1", "2", "--context", "8",
                         "--contexts", "8", "24", "--context-batches", "2", "--steps", "2", "--bandwidth-gib", "0.05",
                         "--json", str(out),
                         "--png", str(png)]) == 0
    written = json.loads(out.read_text())
    rows = written["rows"]
    from etr.models.loader import load_model
    plain = load_model(path, torch.bfloat16, "cpu")
    assert written["weight_bytes"] == scaling.weight_bytes(plain) > 0.8 * sum(p.numel() * 2 for p in plain.parameters())
    points = {(r["engine"], r["batch"], r["context"]) for r in rows}
    assert points == {(e, b, c) for e in ("etr", "hf") for b, c in [(1, 8), (2, 8), (2, 24)]}
    # Every figure is a time between tokens (HF's from its streamer), never a difference of two runs.
    assert all(r["floor_ms"] > 0 and r["ms_per_step"] > 0 for r in rows)
    cfg = load_model_config(path)
    for r in rows:  # each floor is the step's bytes at the probe that row printed
        read = r["read_gb_s"] * 1e9
        assert read > 0
        assert r["floor_ms"] == pytest.approx(scaling.step_bytes(cfg, written["weight_bytes"], r["batch"],
                                                                 r["context"], 2) / read * 1e3)
    for r in rows:  # the tensor floor: the weights' read time (positive) plus the KV at the row's probe
        kv_ms = (scaling.step_bytes(cfg, written["weight_bytes"], r["batch"], r["context"], 2)
                 - written["weight_bytes"]) / (r["read_gb_s"] * 1e9) * 1e3
        assert r["tensor_floor_ms"] > kv_ms > 0
    # Each point's compute floor is its FLOPs at the peak that row printed (measured around it); none where this CPU
    # has no AVX512-BF16 (the run's start peak is None there, and every row's 0).
    params = scaling.matrix_params(plain)
    for r in rows:
        peak = r["peak_gflop_s"]
        assert (peak > 0) == (written["dot_peak_gflop_s"] is not None)
        want = scaling.step_flops(cfg, params, r["batch"], r["context"]) / (peak * 1e9) * 1e3 if peak else 0.0
        assert r["compute_floor_ms"] == pytest.approx(want)
    assert png.stat().st_size > 0 and "| etr | 2 | 24 |" in capsys.readouterr().out


def test_vllm_peer_draws_the_same_prompts():
    scaling, peer = load_bench("scaling"), load_bench("vllm_peer")
    for batch, context in [(1, 7), (16, 128)]:
        assert peer.scaling_prompt(batch, context, 300) == scaling.scaling_prompt(batch, context, 300)


def test_vllm_peer_sizes_its_kv_space_from_the_config(tmp_path):
    """The vLLM peer's KV space comes from the checkpoint (K and V of every layer, its KV heads and head size)."""
    peer = load_bench("vllm_peer")
    path = make_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    cfg = load_model_config(path)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    assert peer.kv_bytes_per_token(str(path), "bfloat16") == per_token * 2
    assert peer.kv_bytes_per_token(str(path), "float32") == per_token * 4
    text = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": text}))
    assert peer.kv_bytes_per_token(str(path), "bfloat16") == per_token * 2  # the nested language model's


def test_vllm_points_join_the_table(tmp_path, capsys):
    """The vLLM peer's figures (a stand-in interpreter that prints what vllm_peer.py prints) become rows with
    their point's floor; a failed peer leaves its rows out and says so."""
    scaling = load_bench("scaling")
    path = make_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho \'{"ms_per_step": [2.5, 4.0]}\'\n')
    fake.chmod(0o755)
    out = tmp_path / "s.json"
    assert scaling.main(["--model", str(path), "--batches", "1", "2", "--context", "8", "--contexts", "8",
                         "--context-batches", "1", "--steps", "2", "--bandwidth-gib", "0.05", "--no-hf",
                         "--vllm-python", str(fake), "--json", str(out)]) == 0
    args = (tmp_path / "args").read_text().split()
    assert args[1:] == ["scaling", str(path), "bfloat16", "2", "260", "1:8", "2:8"]
    rows = {(r["engine"], r["batch"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("vllm", 1)]["ms_per_step"] == 2.5 and rows[("vllm", 2)]["tok_s"] == 2 / 4.0 * 1e3
    cfg = load_model_config(path)
    wbytes = json.loads(out.read_text())["weight_bytes"]
    measured = json.loads(out.read_text())["dot_peak_gflop_s"] is not None
    for batch in (1, 2):
        vllm, ours = rows[("vllm", batch)], rows[("etr", batch)]
        assert vllm["floor_ms"] == pytest.approx(scaling.step_bytes(cfg, wbytes, batch, 8, 2)
                                                 / (vllm["read_gb_s"] * 1e9) * 1e3)
        # The same FLOPs as the engine's point, at the peak measured around vLLM's run (none without the op).
        assert (vllm["peak_gflop_s"] > 0) == measured and vllm["tensor_floor_ms"] > 0
        assert vllm["compute_floor_ms"] * vllm["peak_gflop_s"] == pytest.approx(
            ours["compute_floor_ms"] * ours["peak_gflop_s"])
    assert "| vllm | 2 | 8 | 4.0 |" in capsys.readouterr().out
    fake.write_text("#!/bin/sh\nexit 3\n")
    assert scaling.main(["--model", str(path), "--batches", "1", "--context", "8", "--contexts", "8",
                         "--context-batches", "1", "--steps", "2", "--bandwidth-gib", "0.05", "--no-hf",
                         "--vllm-python", str(fake), "--json", str(out)]) == 0
    assert {r["engine"] for r in json.loads(out.read_text())["rows"]} == {"etr"}
    assert "vLLM failed" in capsys.readouterr().err


def test_a_measurement_is_bracketed_by_probes_and_takes_the_higher(monkeypatch):
    """The machine's bandwidth drifts: a point's floor comes from probes taken right before and right after it,
    the higher of the two (the stricter floor), whichever comes first."""
    scaling = load_bench("scaling")
    for probes, want in (([30e9, 45e9], 45e9), ([45e9, 30e9], 45e9)):
        seen = iter(probes)
        order = []
        monkeypatch.setattr(scaling, "read_bandwidth", lambda **kw: order.append("probe") or next(seen))
        assert scaling.bracketed(lambda: order.append("measure") or 7.5, torch.ones(4)) == (7.5, want, 0.0, 0.0)
        assert order == ["probe", "measure", "probe"]
    # With tensors, they are read right before and right after too, and the faster read counts.
    reads = iter([0.004, 0.003])
    order = []
    monkeypatch.setattr(scaling, "read_bandwidth", lambda **kw: order.append("probe") or 40e9)
    monkeypatch.setattr(scaling, "tensor_read_s", lambda tensors: order.append(f"read {len(tensors)}") or next(reads))
    got = scaling.bracketed(lambda: order.append("measure") or 7.5, torch.ones(4), [torch.ones(2), torch.ones(3)])
    assert got == (7.5, 40e9, 0.003, 0.0) and order == ["probe", "read 2", "measure", "read 2", "probe"]
    # The compute peak drifts too: measured right before and right after, the higher counts, whichever comes first.
    for peaks in ([470.0, 960.0], [960.0, 470.0]):
        seen, order = iter(peaks), []
        got = scaling.bracketed(lambda: order.append("measure") or 7.5, torch.ones(4),
                                peak=lambda: order.append("peak") or next(seen))
        assert got == (7.5, 40e9, 0.0, 960.0) and order == ["probe", "peak", "measure", "peak", "probe"]


def test_tensor_read_sums_every_tensor(monkeypatch):
    scaling = load_bench("scaling")
    summed = []

    class Seen(torch.Tensor):
        def sum(self, *args, **kwargs):
            summed.append(self.numel())
            return super().sum(*args, **kwargs)
    tensors = [torch.ones(n).as_subclass(Seen) for n in (3, 5, 7)]
    assert scaling.tensor_read_s(tensors, repeats=2) > 0 and summed == [3, 5, 7, 3, 5, 7]


def test_the_plotted_floor_is_the_strictest_of_a_points_probes():
    scaling = load_bench("scaling")
    rows = [scaling.Point("etr", 1, 8, 2.0, 500, 1.5, 40), scaling.Point("hf", 1, 8, 9.0, 111, 1.8, 33),
            scaling.Point("etr", 2, 8, 2.5, 800, 1.6, 41)]
    assert scaling.floor_line(rows, lambda r: r.batch) == [(1, 1.5), (2, 1.6)]


class FakeVllmEngine:
    """vLLM's LLMEngine as vllm_peer.decode_ms drives it: requests get their first token at different steps
    (a chunked prefill), then one token a step up to ``tokens``; the clock advances 1 s at each prefill step and
    0.25 s at each decode step."""

    def __init__(self, first_token_step: list[int], tokens: int, clock: list[float]):
        self.first, self.tokens, self.clock, self.n = first_token_step, tokens, clock, 0
        self.ids: list[str] = []
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params):
        self.ids.append(request_id)

    def has_unfinished_requests(self):
        return not self.aborted and any(self.n < f + self.tokens - 1 for f in self.first)

    def abort_request(self, request_ids):
        self.aborted += request_ids

    def step(self):
        self.n += 1
        self.clock[0] += 1.0 if self.n <= max(self.first) else 0.25
        out = []
        for rid, f in zip(self.ids, self.first):
            got = max(0, self.n - f + 1)
            if got and got <= self.tokens:
                out.append(SimpleNamespace(request_id=rid, finished=got == self.tokens,
                                           outputs=[SimpleNamespace(token_ids=list(range(got)))]))
        return out


def test_vllm_decode_steps_are_timed_after_every_first_token(monkeypatch):
    """The timed steps start after the step that gave the last request its first token, every one gives every
    request a token, and the requests are aborted after them; a batch that shrinks inside them is refused."""
    peer = load_bench("vllm_peer")
    clock = [0.0]
    monkeypatch.setattr(peer.time, "perf_counter", lambda: clock[0])
    engine = FakeVllmEngine([1, 3], tokens=40, clock=clock)  # the second request's prefill ends at step 3
    assert peer.decode_ms(engine, ["a", "b"], None, 4, "t") == pytest.approx(250.0)
    assert engine.n == 7 and engine.aborted == ["t-0", "t-1"]
    # The first request finishes 5 steps after its first token, inside the 4 steps timed after step 3.
    short = FakeVllmEngine([1, 3], tokens=5, clock=clock)
    with pytest.raises(RuntimeError, match="gave 1 of 2 requests a token"):
        peer.decode_ms(short, ["a", "b"], None, 4, "u")
    assert short.aborted == ["u-0", "u-1"]
    with pytest.raises(RuntimeError, match="max_tokens too small"):
        peer.decode_ms(FakeVllmEngine([1], tokens=1, clock=clock), ["a"], None, 4, "v")


def test_hf_steps_are_timed_from_the_first_token(monkeypatch):
    """HF's ms per step comes from its streamer's times: the prefill (prompt put to first token) is left out."""
    scaling = load_bench("scaling")
    clock = [0.0]
    monkeypatch.setattr(scaling.time, "perf_counter", lambda: clock[0])

    class Model:  # the prompt is put, 5 s of prefill, the first token, then a token every 0.5 s
        def generate(self, ids, max_new_tokens, streamer, **kw):
            streamer.put(ids)
            for i in range(max_new_tokens):
                clock[0] += 5.0 if i == 0 else 0.5
                streamer.put(None)
    assert scaling.hf_ms(Model(), 1, 4, 3, 50) == pytest.approx(500.0)


def test_roofline_takes_the_higher_floor():
    scaling = load_bench("scaling")
    bound_by_memory = scaling.Point("etr", 1, 8, 12.0, 83.0, floor_ms=6.0, read_gb_s=40.0, compute_floor_ms=1.0)
    bound_by_math = scaling.Point("etr", 64, 8, 12.0, 5333.0, floor_ms=3.0, read_gb_s=40.0, compute_floor_ms=8.0)
    assert bound_by_memory.over_roofline == 2.0 and bound_by_math.over_roofline == 1.5
    assert bound_by_math.over_floor == 4.0  # the bandwidth ratio stays what it was


def test_repeats_sweep_again_and_summarize_each_point(tmp_path, capsys, monkeypatch):
    """--repeats 2: every point measured in each of two whole sweeps (the JSON keeps both), a per-point table of
    medians and ranges, and the plot drawn from each point's median run."""
    scaling = load_bench("scaling")
    path = make_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    measured, steps = [], scaling.decode_steps

    def watched(llm, batch, context, n, seed):  # every sweep's prompts are new work: no prefix-cache hit
        run, seqs = steps(llm, batch, context, n, seed=seed)
        measured.append((context, [s.token_ids[:s.num_prompt_tokens] for s in seqs],
                         [s.num_cached_tokens for s in seqs]))
        return run, seqs
    monkeypatch.setattr(scaling, "decode_steps", watched)
    # 16 given twice (and as the batch sweep's context): measured once a sweep
    assert scaling.main(["--model", str(path), "--dtype", "bfloat16", "--batches", "1", "--context", "8",
                         "--contexts", "8", "16", "16", "--context-batches", "1", "--steps", "2",
                         "--bandwidth-gib", "0.05", "--no-hf", "--repeats", "2", "--json", str(out),
                         "--png", str(png)]) == 0
    assert [c for c, _, _ in measured] == [8, 16, 8, 16]
    assert all(cached == [0] for _, _, cached in measured)
    assert measured[0][1] != measured[2][1] and measured[1][1] != measured[3][1]
    written = json.loads(out.read_text())
    assert written["repeats"] == 2
    rows = written["rows"]
    assert sorted((r["batch"], r["context"], r["repeat"]) for r in rows) == [(1, 8, 0), (1, 8, 1), (1, 16, 0),
                                                                             (1, 16, 1)]
    assert [r["repeat"] for r in rows] == [0, 0, 1, 1]  # whole sweeps, one after the other
    printed = capsys.readouterr().out
    assert "sweep 2 of 2" in printed and "| engine | batch | context | runs | ms/step |" in printed
    for context in (8, 16):
        mine = [r for r in rows if r["context"] == context]
        ms = sorted(r["ms_per_step"] for r in mine)
        assert f"| etr | 1 | {context} | 2 | {(ms[0] + ms[1]) / 2:.1f} ({ms[0]:.1f} .. {ms[1]:.1f}) |" in printed
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit):
        scaling.main(["--model", str(path), "--repeats", "0"])


def test_a_points_median_run_is_one_of_its_runs():
    scaling = load_bench("scaling")

    def run(ms, floor, repeat):
        return scaling.Point("etr", 1, 8, ms, 1e3 / ms, floor, 50.0, repeat=repeat)
    # x floor 2.0, 0.5, 3.0, 1.0: by x floor the lower middle is repeat 3 (by ms it would be repeat 1)
    runs = [run(1.0, 0.5, 0), run(2.0, 4.0, 1), run(3.0, 1.0, 2), run(4.0, 4.0, 3)]
    runs.append(scaling.Point("etr", 2, 8, 5.0, 400.0, 1.0, 50.0))
    picked = scaling.median_runs(runs)
    assert [(r.batch, r.repeat) for r in picked] == [(1, 3), (2, 0)]
    assert scaling.middle([3.0, 1.0, 2.0]) == "2.0 (1.0 .. 3.0)" and scaling.middle([1.0, 4.0]) == "2.5 (1.0 .. 4.0)"
    assert scaling.middle([float("nan"), 2.0]) == "2.0 (2.0 .. 2.0)" and scaling.middle([float("nan")]) == "-"
