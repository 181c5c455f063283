"""bench/host_overhead.py runs (both paths) and reports a figure per batch; its numbers are not asserted."""

from conftest import load_bench


def test_host_overhead_both_paths(capsys):
    bench = load_bench("host_overhead")
    assert bench.main(["--batch", "1", "3", "--steps", "6"]) == 0
    assert bench.main(["--batch", "2", "--steps", "6", "--graph-path"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "3", "2"] and all(float(r[1]) > 0 for r in rows)
    assert rows[0][3].endswith("%") and rows[2][2] == "-"
