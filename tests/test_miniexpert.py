"""MiniExpert: domains and tokenizer, and the quick profile built end to end (checkpoints the engine loads,
held-out data kept apart, every report written, experts better than the meta)."""

import importlib.util
import json
import random

import pytest

from etr.errors import ConfigError
from etr.routing.miniexpert.domains import alphabet, make_domains, make_table, unique_pairs
from etr.routing.miniexpert.tokenizer import CharEncoder, build_tokenizer


def test_domains_are_exact_and_seeded():
    d = make_domains(seed=5)
    r = random.Random(0)
    for _ in range(200):
        q, a = d["multiplication"].sample(r)
        x, y = q.removeprefix("mul ").removesuffix("=").split("*")
        assert int(a) == int(x) * int(y) and 11 <= int(x) <= 29 and 2 <= int(y) <= 9
        q, a = d["sorting"].sample(r)
        assert a == "".join(sorted(q.removeprefix("sort ").removesuffix("=")))
        q, a = d["reversal"].sample(r)
        assert a == q.removeprefix("reverse ").removesuffix("=")[::-1]
    assert make_table(5, 30) == make_table(5, 30) != make_table(6, 30)
    for table, size in (("atlas", 120), ("inventors", 120), ("multiplication", 152)):
        known = {d[table].meta_sample(r)[0] for _ in range(1000)}
        assert len(known) == size // 10  # the meta's mixture shows a tenth of each table
        # Held out by construction: collection and test ask about disjoint halves of the facts; the expert
        # trains on all of them.
        collect = {q for q, _ in unique_pairs(d[table].for_collection(), size, r)}
        test = {q for q, _ in unique_pairs(d[table].for_test(), size, r)}
        assert not collect & test and len(collect) == size - size // 2 and len(test) == size // 2
        assert {q for q, _ in unique_pairs(d[table].sample, size, r)} == collect | test
    pairs = unique_pairs(d["reversal"].sample, 50, r, exclude={"reverse abcd="})
    assert len({q for q, _ in pairs}) == 50 and "reverse abcd=" not in {q for q, _ in pairs}
    assert all(set(q + a) <= set(alphabet()) for dom in d.values() for q, a in unique_pairs(dom.sample, 20, r))


def test_tokenizer_matches_the_fast_encoder(tmp_path):
    tok = build_tokenizer(alphabet())
    tok.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    enc = CharEncoder(alphabet())
    for text in ["mul 12*3=", "capital of Kalomi?", "who made the Jinpe?"]:
        assert loaded(text).input_ids == enc.query(text)
        assert loaded.decode(enc.answer(text), skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from etr.routing.miniexpert.build import build
    out = tmp_path_factory.mktemp("mx") / "lib"
    return out, build(out, "quick", seed=0, progress=False, log=lambda *_: None)


@pytest.mark.slow
def test_quick_build_end_to_end(quick):
    from etr import LLM, SamplingParams
    out, results = quick
    plot = ["routing.png"] if importlib.util.find_spec("matplotlib") else []  # the [plot] extra
    for name in ["results.md", "results.json", *plot, "sets.jsonl", "head.safetensors",
                 "head_base.safetensors", "head_extended.safetensors", "router.safetensors"]:
        assert (out / name).exists(), name
    assert not out.with_name("lib.partial").exists()
    test = [json.loads(x) for x in (out / "data" / "test.jsonl").read_text().splitlines()]
    collected = {json.loads(x)["query"] for x in (out / "data" / "collect.jsonl").read_text().splitlines()}
    assert not {t["query"] for t in test} & collected  # skills and facts alike: routing is measured held out
    s = results["summary"]
    assert list(s) == ["meta", "oracle", "random", "router", "etr", "etr_extended"]
    experts = ["reversal", "sorting", "multiplication", "atlas", "inventors"]
    mean = {m: sum(s[m]["domain_accuracy"][e] for e in experts) / 5 for m in s}
    assert mean["oracle"] > mean["meta"] + 0.15  # the fine-tuned experts know their domains
    # The quick profile's bars (routing/miniexpert/results.py) hold: measured on seed 0, 98.8% routing on
    # held-out questions, experts 65 points above the meta on average, extension -0.6 points.
    assert len(results["bars"]) == 5 and [b["bar"] for b in results["bars"] if not b["holds"]] == []
    assert results["summary"]["etr"]["routing_accuracy"] >= 0.9
    # The report gives routing on skills and facts apart, at the first token only, and the late switches.
    assert "| on skills | on facts | at the first token | late switches |" in (out / "results.md").read_text()
    assert results["skill_domains"] == ["reversal", "sorting"]
    assert results["fact_domains"] == ["multiplication", "atlas", "inventors"]
    # The checkpoints are ordinary ones: the engine loads them and switches with the trained head.
    llm = LLM(str(out / "meta"), dtype="float32", num_kv_blocks=64,
              experts={e: str(out / "experts" / e) for e in experts}, expert_head=str(out / "head.safetensors"))
    records = [r for r in json.loads((out / "results.json").read_text())["records"] if r["method"] == "etr"]
    picks = records[::37]
    outs = llm.generate([test[r["index"]]["query"] for r in picks], SamplingParams(temperature=0.0, max_tokens=12),
                        use_tqdm=False)
    for r, o in zip(picks, outs):  # the reported answers are the engine's
        assert (o.text, o.expert or "meta") == (r["text"], r["model"])
    assert llm.switcher.all_free()


def test_build_refuses_a_non_empty_directory(tmp_path):
    from etr.routing.miniexpert.build import build
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        build(tmp_path / "x", "quick", progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="unknown MiniExpert profile 'huge'"):
        build(tmp_path / "y", "huge", progress=False, log=lambda *_: None)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
