"""bench/throughput.py end to end on a tiny model (no peers): every row gets its bandwidth floor."""

import json

from conftest import load_bench, make_tiny_checkpoint


def test_throughput_rows_carry_their_bandwidth_floor(tmp_path, capsys):
    throughput = load_bench("throughput")
    path = make_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "t.json"
    assert throughput.main(["--model", str(path), "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "4",
                            "--repeats", "1", "--bandwidth-gib", "0.05", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["read_gb_s"] > 0 and r["floor_tok_s"] > 0
        assert abs(r["ratio_vs_floor"] - r["etr_tok_s"] / r["floor_tok_s"]) < 1e-9
    # Each row's floor is at its own probe. Per GB/s of probe, twice the batch reads the same weights and twice the
    # KV: less than twice the floor's tok/s, more than once.
    per_probe = [r["floor_tok_s"] / r["read_gb_s"] for r in rows]
    assert per_probe[0] < per_probe[1] < 2 * per_probe[0]
    printed = capsys.readouterr().out
    assert "etr/floor" in printed and "read bandwidth" in printed


def test_a_rounds_floor_comes_from_probes_around_its_engine_run(tmp_path, monkeypatch):
    """The machine drifts within minutes: every round probes right before and right after the engine's run and
    draws its floor at the higher probe, so rows measured in different stretches get different floors."""
    throughput, scaling = load_bench("throughput"), load_bench("scaling")
    probes = iter([30e9, 45e9, 60e9, 50e9])
    monkeypatch.setattr(scaling, "read_bandwidth", lambda **kw: next(probes))
    path = make_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "t.json"
    assert throughput.main(["--model", str(path), "--batch", "1", "--prompt-len", "8", "--new-tokens", "4",
                            "--repeats", "1", "--rounds", "2", "--bandwidth-gib", "0.01", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["read_gb_s"] for r in rows] == [45.0, 60.0]
    assert abs(rows[1]["floor_tok_s"] / rows[0]["floor_tok_s"] - 60 / 45) < 1e-9


def test_rounds_repeat_every_batch_and_summarise(tmp_path, capsys):
    throughput = load_bench("throughput")
    path = make_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "t.json"
    assert throughput.main(["--model", str(path), "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "4",
                            "--repeats", "1", "--rounds", "3", "--bandwidth-gib", "0.05", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["round"]) for r in rows] == [(b, i) for b in (1, 2) for i in range(3)]
    printed = capsys.readouterr().out
    for batch in (1, 2):
        ratios = sorted(r["ratio_vs_hf"] for r in rows if r["batch"] == batch)
        assert f"batch {batch}: etr/HF {ratios[1]:.2f} ({ratios[0]:.2f} .. {ratios[2]:.2f})" in printed
