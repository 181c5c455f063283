"""The flash-attn backend's plumbing (paged prefill with prefix hits, paged decode, page size) against a torch
model of flash-attn's functions; the real library is exercised only where it is installed (GPU suite)."""

import sys

import pytest
import torch

import fake_flash_attn
from conftest import hf_greedy
from etr import LLM, SamplingParams
from etr.errors import ConfigError


@pytest.fixture
def fake_flash(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn)


def test_flash_backend_matches_hf_with_prefix_hits(fake_flash, tiny_dir, hf_model_of):
    path = tiny_dir("llama_tied_gqa")
    llm = LLM(str(path), dtype="float32", attention_backend="flash", num_kv_blocks=8)
    assert llm.engine.block_size == 256 and llm.engine.runner.backend.name == "flash"
    shared = [(7 * i) % 250 for i in range(300)]  # > one 256-token page: the second request hits the cache
    prompts = [shared + [1, 2, 3], shared + [9] * 20, [5, 6, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    assert rest[0].metrics.num_cached_prompt_tokens == 256
    for prompt, out in zip(prompts, first + rest):
        assert out.token_ids == hf_greedy(hf_model_of(path), prompt, 6)


def test_flash_page_size_and_availability(fake_flash, tiny_dir, monkeypatch):
    with pytest.raises(ConfigError, match="block_size=16 does not suit attention backend 'flash'"):
        LLM(str(tiny_dir("llama_tied_gqa")), dtype="float32", attention_backend="flash", block_size=16)
    assert LLM(str(tiny_dir("llama_tied_gqa")), dtype="float32", num_kv_blocks=4).engine.runner.backend.name == "torch"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    with pytest.raises(ConfigError, match="needs flash_attn"):
        LLM(str(tiny_dir("llama_tied_gqa")), dtype="float32", attention_backend="flash")


def test_auto_backend_choice(monkeypatch):
    from etr.engine.attention import resolve_backend
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing runs on them
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("auto", cuda) == "triton"
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn)
    assert resolve_backend("auto", cuda) == "flash" and resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cuda) == "torch"
    with pytest.raises(ConfigError, match="'paged' is not available"):
        resolve_backend("paged", cpu)
