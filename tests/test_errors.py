"""Bad input gets a named exception that shows the offending value, and leaves the engine usable."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from etr import LLM, SamplingParams
from etr.errors import (ConfigError, InvalidPromptError, InvalidSamplingParamsError, MissingTensorError,
                        PromptTooLongError, TensorShapeError, TokenizerMissingError, UnexpectedTensorError,
                        UnsupportedArchitectureError, UnsupportedDeviceError, UnsupportedDTypeError)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir("llama_tied_gqa")), dtype="float32", max_model_len=64, num_kv_blocks=16)


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5),
                                         ("max_tokens", 0), ("min_p", 2.0), ("top_k", -3)])
def test_sampling_params_out_of_range(field, value):
    with pytest.raises(InvalidSamplingParamsError, match=f"{field}={value!r}"):
        SamplingParams(**{field: value})


def test_prompt_errors_leave_engine_clean(llm):
    ok = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(PromptTooLongError, match="70 tokens.*max_model_len=64"):
        llm.generate([[1, 2], [5] * 70], ok, use_tqdm=False)
    with pytest.raises(InvalidPromptError, match="empty prompt"):
        llm.generate([[3], []], ok, use_tqdm=False)
    with pytest.raises(InvalidPromptError, match=r"\[999\]"):
        llm.generate([[1, 999]], ok, use_tqdm=False)
    with pytest.raises(TokenizerMissingError, match="hello"):
        llm.generate("hello", ok, use_tqdm=False)  # the tiny checkpoint has no tokenizer files
    assert llm.engine.block_manager.all_free() and not llm.engine.has_unfinished()
    assert len(llm.generate([[1, 2, 3]], ok, use_tqdm=False)[0].token_ids) >= 1


def test_request_larger_than_pool_is_refused(llm):
    # 16 blocks of 16 tokens: a 60-token prompt fits max_model_len, and so does its output, in 4 blocks;
    # a pool of 2 blocks cannot hold it.
    small = LLM(llm.engine.model_dir, dtype="float32", max_model_len=64, num_kv_blocks=2)
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        small.generate([[1] * 40], SamplingParams(max_tokens=10), use_tqdm=False)


def test_failure_mid_generation_frees_blocks(llm, monkeypatch):
    calls = {"n": 0}
    real_run = llm.engine.runner.run

    def flaky(seqs, is_prefill):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return real_run(seqs, is_prefill)

    monkeypatch.setattr(llm.engine.runner, "run", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate([[1, 2], [3, 4, 5]], SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert llm.engine.block_manager.all_free() and not llm.engine.has_unfinished()
    monkeypatch.undo()
    assert len(llm.generate([[1, 2]], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0].token_ids) == 5


def test_a_failed_step_leaves_no_prefix_to_revive(tiny_dir, monkeypatch):
    # The prefill's blocks are registered for prefix caching when handed out, before their KV is written; if the
    # step fails, a later request with the same prompt must compute it again, not read blocks never written.
    path = str(tiny_dir("llama_tied_gqa"))
    prompt, params = list(range(3, 40)), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = LLM(path, dtype="float32", block_size=4, num_kv_blocks=64).generate([prompt], params, use_tqdm=False)
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=64)
    llm.engine.runner.kv_pool.fill_(float("nan"))  # what a failed step may leave
    def lost(*args):
        raise RuntimeError("device lost")
    for name in ("run", "run_greedy"):
        monkeypatch.setattr(llm.engine.runner, name, lost)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([prompt], params, use_tqdm=False)
    monkeypatch.undo()
    got = llm.generate([prompt], params, use_tqdm=False)[0]
    assert got.metrics.num_cached_prompt_tokens == 0 and got.token_ids == want[0].token_ids
    assert llm.generate([prompt], params, use_tqdm=False)[0].metrics.num_cached_prompt_tokens == 36


def test_unknown_dtype_and_device(tiny_dir):
    path = str(tiny_dir("llama_tied_gqa"))
    with pytest.raises(UnsupportedDTypeError, match="'int8'"):
        LLM(path, dtype="int8")
    with pytest.raises(UnsupportedDeviceError, match="'tpu'"):
        LLM(path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedDeviceError, match="cuda:0"):
            LLM(path, device="cuda:0")


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(tiny_dir, tmp_path):
    path = copy_checkpoint(tiny_dir("llama_tied_gqa"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        LLM(str(path))


def test_engine_settings_out_of_range(tiny_dir):
    with pytest.raises(ConfigError, match="block_size=0"):
        LLM(str(tiny_dir("llama_tied_gqa")), block_size=0)
    with pytest.raises(ConfigError, match="'flash'"):
        LLM(str(tiny_dir("llama_tied_gqa")), attention_backend="flash", num_kv_blocks=8)
    with pytest.raises(ConfigError, match="max_num_seqs=0"):
        LLM(str(tiny_dir("llama_tied_gqa")), max_num_seqs=0)
    with pytest.raises(ConfigError, match=r"expert_devices names unknown expert\(s\) \['law'\]"):
        LLM(str(tiny_dir("llama_tied_gqa")), expert_devices={"law": "cpu"})


def test_one_config_object(tiny_dir):
    """LLM(config=...) runs exactly the given options; every engine shares that one frozen object."""
    import dataclasses
    from etr.engine import EngineConfig
    path = str(tiny_dir("llama_tied_gqa"))
    config = EngineConfig(model=path, dtype="float32", max_num_seqs=4, num_kv_blocks=16)
    assert config.dtype == torch.float32 and config.max_model_len > 0 and config.expert_head is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 8
    llm = LLM(config=config)
    assert llm.config is config and llm.engine.config is config and llm.engine.runner.max_num_seqs == 4
    ids = [1, 2, 3]
    greedy = SamplingParams(temperature=0.0, max_tokens=5)
    assert llm.generate([ids], greedy)[0].token_ids == LLM(path, dtype="float32", max_num_seqs=4,
                                                            num_kv_blocks=16).generate([ids], greedy)[0].token_ids
    with pytest.raises(ConfigError, match="not both"):
        LLM(path, config=config)
    with pytest.raises(ConfigError, match=r"\['max_num_seqs'\] given beside config="):
        LLM(config=config, max_num_seqs=2)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def edit_weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_names_file_and_tensor(tiny_dir, tmp_path):
    path = copy_checkpoint(tiny_dir("llama_tied_gqa"), tmp_path / "m")
    edit_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"):
        LLM(str(path))


def test_wrong_shape_names_file_and_tensor(tiny_dir, tmp_path):
    path = copy_checkpoint(tiny_dir("llama_tied_gqa"), tmp_path / "m")
    edit_weights(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(3, 64)}))
    with pytest.raises(TensorShapeError, match=r"model\.safetensors.*k_proj\.weight.*\(3, 64\)"):
        LLM(str(path))


def test_unexpected_tensor(tiny_dir, tmp_path):
    path = copy_checkpoint(tiny_dir("llama_tied_gqa"), tmp_path / "m")
    edit_weights(path, lambda t: t.update({"transformer.h.0.attn.weight": torch.zeros(2)}))
    with pytest.raises(UnexpectedTensorError, match="transformer.h.0.attn.weight"):
        LLM(str(path))
