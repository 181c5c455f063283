"""Query-set collection: Eq. 3 thresholding and tie rules, data formats, and the whole step on tiny models."""

import json

import pytest
import torch

from conftest import make_tiny_checkpoint
from etr.models import load_model
from etr.models.tokenizer import load_tokenizer
from etr.routing.collect import compute_losses, downsample, load_pairs, query_sets, summary, write_sets


def test_threshold_and_ties():
    losses = {"meta": torch.tensor([5.0, 5.0, 5.0, 1.0]), "a": torch.tensor([1.0, 4.8, 2.0, 1.0]),
              "b": torch.tensor([2.0, 6.0, 2.0, 0.0])}
    assert query_sets(losses, "meta", tau=0.5) == {"a": [0, 2], "b": [0, 2, 3]}
    # best: pair 0 goes to a (gap 4 > 3); pair 2 ties (3 = 3) and goes to the lowest name; pair 3 to b.
    assert query_sets(losses, "meta", tau=0.5, ties="best") == {"a": [0, 2], "b": [3]}
    assert query_sets(losses, "meta", tau=3.5) == {"a": [0], "b": []}


def test_downsample_is_seeded():
    sets = {"a": list(range(100)), "b": [1, 2]}
    one, two = downsample(sets, 10, seed=3), downsample(sets, 10, seed=3)
    assert one == two and len(one["a"]) == 10 and one["b"] == [1, 2] and set(one["a"]) <= set(range(100))
    assert downsample(sets, 10, seed=4)["a"] != one["a"]


def test_formats_and_end_to_end(tmp_path):
    spec = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=1, tokenizer=True, **spec)
    expert = make_tiny_checkpoint(tmp_path / "expert", "llama", seed=2, **spec)
    data = tmp_path / "data.jsonl"
    rows = [{"query": "hello", "response": "world"},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
            {"query_ids": [1, 2, 3], "response_ids": [4, 5]}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tok = load_tokenizer(meta)
    pairs = load_pairs(data, tok)
    assert pairs[0].query_ids == tok("hello").input_ids and pairs[1].response == "4" and pairs[2].query_ids == [1, 2, 3]
    templated = load_pairs(data, tok, chat_template=True)
    assert tok.decode(templated[0].query_ids).endswith("assistant: ")
    models = {"meta": load_model(meta, torch.float32, "cpu", 64), "e": load_model(expert, torch.float32, "cpu", 64)}
    losses = compute_losses(models, pairs, batch_size=2, progress=False)
    sets = query_sets(losses, "meta", tau=-1e9)  # every pair qualifies
    out = tmp_path / "sets.jsonl"
    write_sets(out, sets, losses, "meta", pairs)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2]
    assert all(abs(x["gap"] - (x["loss_meta"] - x["loss_expert"])) < 1e-5 and x["loss_meta"] > 0 for x in lines)
    assert "e" in summary(sets, losses, "meta")


def test_collect_cli(tmp_path, capsys):
    from etr.cli import main
    spec = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=1, tokenizer=True, **spec)
    expert = make_tiny_checkpoint(tmp_path / "expert", "llama", seed=2, **spec)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"query": f"q{i}", "response": f"answer {i}"}) for i in range(5)))
    out = tmp_path / "sets.jsonl"
    assert main(["collect", "--meta", str(meta), "--expert", f"law={expert}", "--data", str(data), "--tau=-1e9",
                 "--per-expert", "3", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and {x["expert"] for x in lines} == {"law"}
    assert "law" in capsys.readouterr().out


def test_collect_then_train_then_extend_then_generate(tmp_path):
    """The CLI pipeline writes heads the engine loads; --extend keeps the old rows bit for bit."""
    from etr import LLM, SamplingParams
    from etr.cli import main
    from etr.models.expert_head import load_expert_head
    spec = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    meta = make_tiny_checkpoint(tmp_path / "meta", "llama", seed=1, **spec)
    a = make_tiny_checkpoint(tmp_path / "a", "llama", seed=2, **spec)
    b = make_tiny_checkpoint(tmp_path / "b", "llama", seed=3, **spec)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"query_ids": [i, i + 1, i + 2], "response_ids": [i + 3]}) for i in range(8)))
    sets = tmp_path / "sets.jsonl"
    main(["collect", "--meta", str(meta), "--expert", f"a={a}", "--data", str(data), "--tau=-1e9", "--out", str(sets)])
    lines = sets.read_text().splitlines()
    sets_a = tmp_path / "a.jsonl"
    sets_a.write_text("\n".join(lines))
    sets_b = tmp_path / "b.jsonl"
    sets_b.write_text("\n".join(x.replace('"expert": "a"', '"expert": "b"') for x in lines[:4]))
    head_a, head_ab = tmp_path / "a.safetensors", tmp_path / "ab.safetensors"
    assert main(["train", "--meta", str(meta), "--sets", str(sets_a), "--out", str(head_a)]) == 0
    assert main(["train", "--meta", str(meta), "--sets", str(sets_b), "--extend", str(head_a), "--out", str(head_ab)]) == 0
    old, merged = load_expert_head(head_a), load_expert_head(head_ab)
    assert merged.names == ["a", "b"] and torch.equal(merged.embeddings[:1], old.embeddings)
    assert (tmp_path / "ab.safetensors.log.json").exists()
    llm = LLM(str(meta), dtype="float32", num_kv_blocks=32, experts={"a": str(a), "b": str(b)}, expert_head=str(head_ab))
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 5
