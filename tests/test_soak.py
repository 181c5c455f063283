"""The soak benchmark's short profile (bench/soak.py): 120 requests from 8 clients through ``etr serve`` with
switches, seeded sampling and cancellations; every completed request equals its offline run, no KV block is
held at the end, no 5xx."""

from conftest import load_bench


def test_soak_short_profile(tmp_path, capsys):
    soak = load_bench("soak")
    assert soak.main(["--profile", "short", "--json", str(tmp_path / "soak.json")]) == 0
    out = capsys.readouterr().out
    assert "all checks hold" in out
    import json
    figures = json.loads((tmp_path / "soak.json").read_text())
    assert figures["answered"] == 120 and figures["completed"] >= 100 and figures["switched"] > 0
    assert figures["mismatches"] == [] and figures["http_5xx"] == 0 and not any(figures["kv_blocks_used"].values())
