"""bench/smolexpert_layers.py on a tiny chat model: every setting trains every domain, each row reports its
steps, time, loss and accuracies, and choosing on validation questions never trains on their phrasing."""

import json

import pytest
from conftest import load_bench, make_tiny_checkpoint


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def lib(tmp_path):
    data = tmp_path / "lib" / "data"
    data.mkdir(parents=True)
    rows = [{"domain": d, "query": f"{d} q{i}", "response": f"a{i}", "phrasing": "val" if i >= 6 else "train"}
            for d in ("d", "e") for i in range(9)]
    _write(data / "train.jsonl", rows)
    for name in ("val", "test", "seen"):
        _write(data / f"{name}.jsonl", [{"domain": d, "query": f"{d} {name} q{i}", "answer": f"a{i}", "match": "word"}
                                        for d in ("d", "e") for i in range(3)])
    return tmp_path / "lib"


@pytest.mark.parametrize("on, pairs", [("val", 6), ("test", 9)])
def test_layers_bench_runs_every_setting_on_every_domain(tmp_path, lib, capsys, on, pairs):
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", num_layers=3, tokenizer=True)
    bench = load_bench("smolexpert_layers")
    assert bench.main([str(lib), "--on", on, "--domain", "d", "e", "--settings", "1:2", "all:1",
                       "--batch-size", "4", "--meta", str(meta)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"d: {pairs} pairs, 3 {on} and 3 seen questions"  # --on val: the val phrasing left out
    rows = [line.split() for line in lines[4:]]
    steps = {"1": -(-2 * pairs // 4), "all": -(-pairs // 4)}
    assert [r[:3] for r in rows[:4]] == [["d", "1", "2"], ["e", "1", "2"], ["d", "all", "1"], ["e", "all", "1"]]
    assert all(int(r[3]) == steps[r[1]] for r in rows[:4])
    assert all(r[6].endswith("%") and 0 <= float(r[6][:-1]) <= 100 for r in rows[:4])
    means = rows[4:]
    assert [m[:3] for m in means] == [["mean", "1", "2"], ["mean", "all", "1"]]
    for m, pair in zip(means, (rows[:2], rows[2:4])):
        assert float(m[4][:-1]) == pytest.approx(sum(float(r[6][:-1]) for r in pair) / 2, abs=0.051)


def test_layers_bench_refuses_data_without_phrasings_for_validation(lib):
    rows = [json.loads(line) for line in (lib / "data" / "train.jsonl").read_text().splitlines()]
    _write(lib / "data" / "train.jsonl", [{k: v for k, v in r.items() if k != "phrasing"} for r in rows])
    with pytest.raises(SystemExit, match="does not say each pair's phrasing"):
        load_bench("smolexpert_layers").main([str(lib), "--on", "val", "--domain", "d", "--settings", "1:1"])


@pytest.mark.parametrize("bad", ["8", "all:0", "0:2", "x:2", "8:y"])
def test_layers_bench_names_a_bad_setting(bad, capsys):
    with pytest.raises(SystemExit):
        load_bench("smolexpert_layers").main(["lib", "--settings", bad])
    assert f"setting {bad!r}" in capsys.readouterr().err


def test_layers_bench_writes_the_builds_data_where_the_library_has_none(tmp_path):
    bench = load_bench("smolexpert_layers")
    lib = tmp_path / "lib"
    bench.ensure_data(lib, "quick", 3)
    written = {name: (lib / "data" / f"{name}.jsonl").read_text() for name in ("train", "val", "test", "seen")}
    assert all(written.values())
    train = [json.loads(line) for line in written["train"].splitlines()]
    assert {r["domain"] for r in train} == {"chemistry", "countries"}  # the quick profile's experts
    assert {r["phrasing"] for r in train} == {"train", "val"}
    val_queries = {json.loads(line)["query"] for line in written["val"].splitlines()}
    trained_on = {r["query"] for r in train if r["phrasing"] == "train"}
    assert val_queries and not val_queries & trained_on  # no validation question among the --on val pairs
    other = tmp_path / "other"
    bench.ensure_data(other, "quick", 4)  # another seed draws other facts
    assert (other / "data" / "test.jsonl").read_text() != written["test"]
    (lib / "data" / "train.jsonl").write_text("kept\n")
    bench.ensure_data(lib, "quick", 3)  # data already there: left alone
    assert (lib / "data" / "train.jsonl").read_text() == "kept\n"


def test_layers_bench_trains_each_domain_with_the_builds_seed():
    bench = load_bench("smolexpert_layers")
    # Build.expert_models: seed + 1 + the domain's place in the profile, whatever order --domain gives.
    assert [bench.build_seed("default", 4, d, i) for i, d in enumerate(["python", "countries"])] == [7, 6]
    assert bench.build_seed("default", 4, "other", 1) == 6  # not in the profile: its place in --domain
