"""Stops (EOS from generation_config, stop ids, stop strings, min_tokens, ignore_eos), streaming and chat."""

import json
import shutil

import pytest

from conftest import make_tiny_checkpoint
from etr import LLM, SamplingParams

PROMPT = [104, 101, 108, 108, 111]  # "hello"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tok") / "m", "llama", seed=5, tokenizer=True,
                                hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llm(tok_dir):
    return LLM(str(tok_dir), dtype="float32", num_kv_blocks=64)


@pytest.fixture(scope="module")
def reference(llm):
    """The unconstrained greedy continuation every stop test cuts."""
    return llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]


def first_new_index(tokens, k):
    """An index >= k whose token does not occur earlier (so stopping on it stops exactly there)."""
    return next(i for i in range(k, len(tokens)) if tokens[i] not in tokens[:i])


def greedy(**kw):
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 40, **kw})


def test_every_generation_config_eos_id_stops(tok_dir, reference, tmp_path):
    path = shutil.copytree(tok_dir, tmp_path / "m")
    i = first_new_index(reference.token_ids, 3)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, reference.token_ids[i]]}))
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    out = llm.generate([PROMPT], greedy(), use_tqdm=False)[0]
    assert out.token_ids == reference.token_ids[:i + 1] and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(reference.token_ids[:i])  # the EOS id is not in the text
    ignored = llm.generate([PROMPT], greedy(ignore_eos=True), use_tqdm=False)[0]
    assert ignored.token_ids == reference.token_ids and ignored.finish_reason == "length"


def test_stop_token_ids(llm, reference):
    i = first_new_index(reference.token_ids, 4)
    out = llm.generate([PROMPT], greedy(stop_token_ids=[reference.token_ids[i]], ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == reference.token_ids[:i + 1] and out.finish_reason == "stop"


def test_min_tokens_suppresses_stop_ids(llm, reference):
    first = reference.token_ids[0]
    out = llm.generate([PROMPT], greedy(stop_token_ids=[first], min_tokens=3, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.token_ids) >= 3 and out.token_ids[0] != first


def test_stop_string_trims_text(llm, reference):
    # The random model emits arbitrary bytes; cut at the first printable ASCII character that is new.
    text = reference.text
    start = next(i for i in range(2, len(text)) if text[i].isascii() and text[i].isprintable()
                 and text[i] not in text[:i])
    stop = text[start]
    out = llm.generate([PROMPT], greedy(stop=[stop, "\x00never"], ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]
    assert len(out.token_ids) < len(reference.token_ids)


def test_max_tokens_is_length(llm):
    out = llm.generate([PROMPT], greedy(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_text_prompt_and_single_prompt_forms(llm, reference):
    by_text = llm.generate("hello", greedy(ignore_eos=True), use_tqdm=False)
    by_ids = llm.generate(PROMPT, greedy(ignore_eos=True), use_tqdm=False)
    assert len(by_text) == len(by_ids) == 1
    assert by_text[0].prompt == "hello" and by_text[0].prompt_token_ids == PROMPT
    assert by_text[0].token_ids == by_ids[0].token_ids == reference.token_ids


@pytest.mark.parametrize("stop", [None, "STOPSTRING"])
def test_stream_concatenates_to_generate(llm, reference, stop):
    params = greedy(ignore_eos=True, stop=stop)
    deltas = list(llm.stream(PROMPT, params))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert [t for d in deltas for t in d.token_ids] == reference.token_ids
    assert "".join(d.text for d in deltas) == reference.text == deltas[-1].output.text


def test_stream_closed_early_frees_blocks(llm):
    stream = llm.stream(PROMPT, greedy(ignore_eos=True))
    next(stream), next(stream)
    stream.close()
    assert llm.engine.block_manager.all_free() and not llm.engine.has_unfinished()


def test_chat_applies_template(llm):
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, greedy(max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    rendered = llm.tokenizer("<s>user: hi\n<s>assistant: ", add_special_tokens=False).input_ids
    assert out.prompt_token_ids == rendered
    again = llm.generate([rendered], greedy(max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == again.token_ids
    two = llm.chat([messages, [{"role": "user", "content": "yo"}]], greedy(max_tokens=2), use_tqdm=False)
    assert len(two) == 2


def test_metrics_are_filled(llm):
    out = llm.generate([PROMPT], greedy(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert 0 < out.metrics.time_to_first_token <= out.metrics.total_time
