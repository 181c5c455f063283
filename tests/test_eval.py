"""etr eval: question formats, answer extraction, every method against direct generation, metrics, reports."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_checkpoint
from etr.errors import ConfigError
from etr.routing.eval_data import Question, extract_choice, is_correct, load_mmlu_csv, load_questions
from etr.routing.evaluate import EvalSetup, Record, evaluate, summarize

MMLU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu_expert"
SPEC = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.mark.parametrize("text,letter", [("B", "B"), (" (C) because", "C"), ("Answer: D.", "D"), ("A", "A"),
                                         ("Answer is", None), ("ABCD", None), ("the answer: a", None)])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_mmlu_csv_quoting_header_and_errors(tmp_path):
    path = write_csv(tmp_path / "astronomy_test.csv", [["question", "A", "B", "C", "D", "answer"],
                                                       ['Why "blue", sky?', "x,1", "y", "z", "w", "B"]])
    (q,) = load_mmlu_csv(path)
    assert q.domain == "astronomy" and q.answer == "B" and q.kind == "choice"
    assert 'Why "blue", sky?\nA. x,1\nB. y' in q.prompt and q.prompt.endswith("Answer:")
    assert is_correct(q, " B. y") and not is_correct(q, "A")
    bad = write_csv(tmp_path / "bad.csv", [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(ConfigError, match="bad.csv:1"):
        load_mmlu_csv(bad)
    with pytest.raises(ConfigError, match="no such evaluation data"):
        load_questions(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not MMLU_DIR.exists(), reason="../shared/data/mmlu_expert is not present")
def test_shared_mmlu_expert_loads():
    questions = load_questions(MMLU_DIR)
    domains = {q.domain for q in questions}
    assert len(domains) == 6 and "astronomy" in domains
    assert all(q.answer in "ABCD" for q in questions) and len(questions) > 1000


def test_summary_metrics():
    setup = EvalSetup("m", {"a": "x", "b": "y"}, domain_expert={"da": "a", "db": "b"})
    recs = [Record("etr", 0, "da", "a", "", "A", True, 0), Record("etr", 1, "da", "b", "", "B", False, 0),
            Record("etr", 2, "db", "b", "", "C", True, 3), Record("etr", 3, "gen", "meta", "", "x", True),
            Record("etr", 4, "gen", "a", "", "y", False, 0)]
    s = summarize(recs, setup)["etr"]
    assert s["accuracy"] == pytest.approx(3 / 5) and s["domain_accuracy"] == {"da": 0.5, "db": 1.0, "gen": 0.5}
    # One definition: over the questions of domains with an expert (the general domain is false routing's).
    assert s["routing_accuracy"] == pytest.approx(2 / 3)  # da->a and db->b right, da->b wrong
    assert s["routing_accuracy_at_start"] == pytest.approx(1 / 3)  # db->b came after 3 meta tokens
    assert s["late_switches"] == 1
    assert s["false_routing"] == pytest.approx(0.5)
    assert s["confusion"]["da"] == {"a": 1, "b": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {"meta": make_tiny_checkpoint(root / "meta", "llama", seed=21, tokenizer=True, **SPEC),
            "astro": make_tiny_checkpoint(root / "astro", "llama", seed=22, tokenizer=True, **SPEC),
            "law": make_tiny_checkpoint(root / "law", "qwen2", seed=23, tokenizer=True, **SPEC)}


def hf_text(path, prompt_ids, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return AutoTokenizer.from_pretrained(path).decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def test_methods_answer_like_the_models_they_name(models, tmp_path):
    from etr.models.tokenizer import load_tokenizer
    questions = [Question("astro", "sky?", "x", "exact"), Question("law", "court?", "y", "exact"),
                 Question("general", "hi", "z", "exact")]
    setup = EvalSetup(str(models["meta"]), {"astro": str(models["astro"]), "law": str(models["law"])},
                      domain_expert={"astro": "astro", "law": "law"}, max_tokens=6, seed=3)
    records = evaluate(setup, questions, ["meta", "oracle", "random"], progress=False)
    tok = load_tokenizer(models["meta"])
    by = {(r.method, r.index): r for r in records}
    for i, q in enumerate(questions):
        ids = tok(q.prompt).input_ids
        assert by["meta", i].text == hf_text(models["meta"], ids, 6) and by["meta", i].model == "meta"
        oracle = {"astro": "astro", "law": "law"}.get(q.domain, "meta")
        assert by["oracle", i].model == oracle and by["oracle", i].text == hf_text(models[oracle], ids, 6)
        assert by["random", i].model in ("astro", "law")
    again = evaluate(setup, questions, ["random"], progress=False)
    assert [r.model for r in again] == [by["random", i].model for i in range(3)]  # seeded
    with pytest.raises(ConfigError, match="needs an expert head"):
        evaluate(setup, questions, ["etr"], progress=False)
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['best'\]"):
        evaluate(setup, questions, ["best"], progress=False)


def test_eval_cli_with_etr_and_router(models, tmp_path, capsys):
    """collect -> train -> router -> eval on MMLU-format CSVs: every file written, every method reported."""
    from etr.cli import main
    data = tmp_path / "mmlu"
    data.mkdir()
    for domain in ("astro", "law"):
        write_csv(data / f"{domain}_test.csv", [[f"{domain} q{i}?", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(3)])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"query": f"question {i}", "response": f"answer {i}"}) for i in range(12)))
    sets, head, router = tmp_path / "sets.jsonl", tmp_path / "head.safetensors", tmp_path / "router.safetensors"
    experts = ["--expert", f"astro={models['astro']}", "--expert", f"law={models['law']}"]
    assert main(["collect", "--meta", str(models["meta"]), *experts, "--data", str(pairs), "--tau", "0",
                 "--ties", "best", "--out", str(sets)]) == 0
    assert main(["train", "--meta", str(models["meta"]), "--sets", str(sets), "--out", str(head), "--holdout", "0",
                 "--expert", "astro", "--expert", "law"]) == 0
    assert main(["router", "--meta", str(models["meta"]), "--sets", str(sets), "--out", str(router)]) == 0
    out = tmp_path / "report"
    assert main(["eval", "--meta", str(models["meta"]), *experts, "--head", str(head), "--router", str(router),
                 "--data", str(data), "--max-tokens", "4", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert list(report["summary"]) == ["meta", "oracle", "random", "router", "etr"]
    assert report["summary"]["oracle"]["routing_accuracy"] == 1.0
    assert len(report["records"]) == 5 * 6
    assert (out / "eval.md").read_text().startswith("| method | astro | law |")
    if importlib.util.find_spec("matplotlib"):  # the [plot] extra; without it no plot is written, by design
        assert (out / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "routing.png").exists()
    assert "| etr |" in capsys.readouterr().out
