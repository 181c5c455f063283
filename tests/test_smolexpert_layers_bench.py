"""bench/smolexpert_layers.py on a tiny chat model: both settings train, and each row reports its steps, time,
loss and accuracies."""

import json

from conftest import load_bench, make_tiny_checkpoint


def test_layers_bench_runs_both_settings(tmp_path, capsys):
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", num_layers=3, tokenizer=True)
    data = tmp_path / "lib" / "data"
    data.mkdir(parents=True)
    rows = [{"domain": "d", "query": f"q{i}", "response": f"a{i}"} for i in range(6)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = [{"domain": "d", "query": f"q{i}", "answer": f"a{i}", "match": "word"} for i in range(3)]
    for name in ("test", "seen"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    bench = load_bench("smolexpert_layers")
    assert bench.main([str(tmp_path / "lib"), "--domain", "d", "--layers", "1", "all", "--epochs", "2",
                       "--batch-size", "4", "--meta", str(meta)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("d: 6 pairs, 2 epochs") and "3 test and 3 seen questions" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["1", "all"] and all(r[1] == "3" for r in rows)  # ceil(2 * 6 / 4) steps
    assert all(r[4].endswith("%") and 0 <= float(r[4][:-1]) <= 100 for r in rows)


def test_layers_bench_writes_the_builds_data_where_the_library_has_none(tmp_path):
    bench = load_bench("smolexpert_layers")
    lib = tmp_path / "lib"
    bench.ensure_data(lib, "quick", 3)
    written = {name: (lib / "data" / f"{name}.jsonl").read_text() for name in ("train", "test", "seen")}
    assert all(written.values())
    domains = {json.loads(line)["domain"] for line in written["train"].splitlines()}
    assert domains == {"chemistry", "countries"}  # the quick profile's experts
    other = tmp_path / "other"
    bench.ensure_data(other, "quick", 4)  # another seed draws other facts
    assert (other / "data" / "test.jsonl").read_text() != written["test"]
    (lib / "data" / "train.jsonl").write_text("kept\n")
    bench.ensure_data(lib, "quick", 3)  # data already there: left alone
    assert (lib / "data" / "train.jsonl").read_text() == "kept\n"
