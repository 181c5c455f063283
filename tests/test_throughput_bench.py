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
        assert r["floor_tok_s"] > 0 and abs(r["ratio_vs_floor"] - r["etr_tok_s"] / r["floor_tok_s"]) < 1e-9
    # Twice the batch reads the same weights and twice the KV: less than twice the floor's tok/s, more than once.
    assert rows[0]["floor_tok_s"] < rows[1]["floor_tok_s"] < 2 * rows[0]["floor_tok_s"]
    printed = capsys.readouterr().out
    assert "etr/floor" in printed and "read bandwidth" in printed


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
