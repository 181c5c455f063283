"""Short prefills on the CPU run through the decode-step op, one row per prompt token (engine/model_runner.py,
``_token_rows``), against the model's own prefill (SDPA over the prompt). The two sum the attention in another
order, so they are compared within a tolerance: float32 hidden states and KV within 1e-4 (absolute and relative);
bf16 hidden states within 2e-2 (a bf16 step is 2**-8 relative, and a step in one layer moves what follows), the
KV written within 5e-2 absolute + 2e-2 relative and at least 99 % of it within 2e-2 of both. Prefix-cache hits
attend to the cached pages, except pages another prompt of the step is still filling; prefills past the budget
keep the model's forward."""

import pytest
import torch
from conftest import require_cpp_op

import etr.engine.model_runner as M
from etr.engine.config import EngineConfig
from etr.engine.model_runner import ModelRunner
from etr.engine.sampling_params import SamplingParams
from etr.engine.sequence import Sequence
from etr.kernels import cpu_decode_step as K

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(scope="module")
def op():
    require_cpp_op(K, "CPU decode-step op")


def runner(path, dtype, monkeypatch):
    monkeypatch.setenv("ETR_CPU_STEP_GLUE", "aten")
    monkeypatch.setattr(M, "wants_fp32_gemm", lambda *a: False)
    r = ModelRunner(EngineConfig(model=str(path), dtype=dtype, max_model_len=256, max_num_seqs=8), str(path),
                    torch.device("cpu"))
    r.allocate_kv(64)
    assert r.native_step is not None
    return r


def sequences(r, lengths, g, cached=0):
    """Sequences of random tokens on scattered pages; the first ``cached`` tokens of each counted as cached."""
    seqs, block = [], 0
    for n in lengths:
        seq = Sequence(torch.randint(3, r.config.vocab_size, (n,), generator=g).tolist(), SamplingParams(),
                       r.block_size)
        blocks = -(-n // r.block_size)
        seq.block_table = list(range(block + blocks - 1, block - 1, -1))
        seq.num_cached_tokens = cached
        block += blocks
        seqs.append(seq)
    return seqs


def both_prefills(r, seqs, monkeypatch):
    """(token rows, the forward): last hidden states and the pools each left, from the same pools."""
    pools = [(k.clone(), v.clone()) for k, v in r.kv_caches]
    calls = []
    step = K.DecodeStep.__call__
    monkeypatch.setattr(K.DecodeStep, "__call__", lambda self, *a: calls.append(1) or step(self, *a))
    rows = r.hidden_states(seqs, 0)
    assert calls == [1]
    rows_pools, r.kv_caches = r.kv_caches, pools
    monkeypatch.setattr(M, "SHORT_PREFILL_POSITIONS", 0)
    forward = r.hidden_states(seqs, 0)
    assert calls == [1]
    return (rows, rows_pools), (forward, r.kv_caches)


@pytest.mark.parametrize("name", ["llama_tied_gqa", "qwen2_untied", "qwen2_tied_hd32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_rows_are_the_forwards_prefill(op, tiny_dir, monkeypatch, name, dtype):
    r = runner(tiny_dir(name), dtype, monkeypatch)
    seqs = sequences(r, [1, 17, 5, 40], torch.Generator().manual_seed(len(name)))
    (rows, rows_pools), (forward, pools) = both_prefills(r, seqs, monkeypatch)
    assert rows.shape == forward.shape == (4, r.config.hidden_size)
    torch.testing.assert_close(rows, forward, **TOL[dtype])
    for (k, v), (k2, v2) in zip(rows_pools, pools):  # the slots the prefill wrote (the rest: the same memory)
        slots = [s for q in seqs for s in (r._slot(q, p) for p in range(len(q)))]
        for a, b in ((v, v2),) + (((k, k2),) if k.dim() == 4 else ()):
            flat_a, flat_b = a.flatten(0, 1)[slots].float(), b.flatten(0, 1)[slots].float()
            if dtype == torch.float32:
                torch.testing.assert_close(flat_a, flat_b, **TOL[dtype])
            else:  # a value near 0 one bf16 step away is far off relatively: a looser bound, met by all
                torch.testing.assert_close(flat_a, flat_b, atol=5e-2, rtol=2e-2)
                close = (flat_a - flat_b).abs() <= 2e-2 + 2e-2 * flat_b.abs()
                assert close.float().mean() >= 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefix_cache_hit_attends_to_the_cached_pages(op, tiny_dir, monkeypatch, dtype):
    """Prompts of 40 and 35 tokens whose first 16 (one page) are in the pages already: the rows of the other
    tokens read them as the forward's prefill does."""
    r = runner(tiny_dir("qwen2_tied_hd32"), dtype, monkeypatch)
    g = torch.Generator().manual_seed(1)
    whole = sequences(r, [40, 35], g)
    monkeypatch.setattr(M, "SHORT_PREFILL_POSITIONS", 0)
    r.hidden_states(whole, 0)  # fills the pages, the cached prefix included
    monkeypatch.setattr(M, "SHORT_PREFILL_POSITIONS", 131072)
    for s in whole:
        s.num_cached_tokens = 16
    (rows, _), (forward, _) = both_prefills(r, whole, monkeypatch)
    torch.testing.assert_close(rows, forward, **TOL[dtype])


def test_a_prefill_past_the_budget_keeps_the_forward(op, tiny_dir, monkeypatch):
    r = runner(tiny_dir("qwen2_untied"), torch.float32, monkeypatch)
    seqs = sequences(r, [30], torch.Generator().manual_seed(2))  # 30 rows read 1 + 2 + ... + 30 = 465 positions
    calls = []
    step = K.DecodeStep.__call__
    monkeypatch.setattr(K.DecodeStep, "__call__", lambda self, *a: calls.append(1) or step(self, *a))
    monkeypatch.setattr(M, "SHORT_PREFILL_POSITIONS", 464)
    r.hidden_states(seqs, 0)
    assert calls == []
    monkeypatch.setattr(M, "SHORT_PREFILL_POSITIONS", 465)
    r.hidden_states(seqs, 0)
    assert calls == [1]


def test_short_and_long_sequences_of_one_step_take_their_own_paths(op, tiny_dir, monkeypatch):
    """The choice is per sequence: in one step the short prompt runs as rows and the long one through the forward,
    each with the result it has alone (float32: the same bits, as the rows of a sequence do not depend on the
    others at these lengths)."""
    r = runner(tiny_dir("qwen2_untied"), torch.float32, monkeypatch)
    seqs = sequences(r, [12, 40], torch.Generator().manual_seed(3))  # rows reading 78 and 820 positions
    monkeypatch.setattr(M, "SHORT_PREFILL_POSITIONS", 100)
    calls = []
    step = K.DecodeStep.__call__
    monkeypatch.setattr(K.DecodeStep, "__call__", lambda self, *a: calls.append(a[0].numel()) or step(self, *a))
    together = r.hidden_states(seqs, 0)
    assert calls == [12]  # one call of the op, with the short prompt's 12 rows
    alone = torch.cat([r.hidden_states([s], 0) for s in seqs])
    assert calls == [12, 12] and torch.equal(together, alone)


def test_a_hit_on_pages_another_prompt_of_the_step_is_filling_goes_with_the_forward(op, tiny_dir, monkeypatch):
    """Prompt A (40 tokens, over the budget: the forward) fills pages that prompt B (A's first 32 tokens, then 8
    of its own) hits in the prefix cache in the same step: B's rows would read them before A's forward wrote
    them, so B runs in A's forward, and both get what a forward of the two gives."""
    r = runner(tiny_dir("qwen2_untied"), torch.float32, monkeypatch)
    g = torch.Generator().manual_seed(4)
    a, b = sequences(r, [40, 8], g)
    b.token_ids = a.token_ids[:32] + b.token_ids
    b.block_table = a.block_table[:2] + b.block_table  # A's first two pages, then its own
    b.num_cached_tokens = 32
    assert r._row_reads(a) == 820 and r._row_reads(b) == 8 * 32 + 36
    pools = [(k.clone(), v.clone()) for k, v in r.kv_caches]
    calls = []
    step = K.DecodeStep.__call__
    monkeypatch.setattr(K.DecodeStep, "__call__", lambda self, *a_: calls.append(1) or step(self, *a_))
    monkeypatch.setattr(M, "SHORT_PREFILL_POSITIONS", 500)  # A long, B short
    got = r.hidden_states([a, b], 0)
    assert calls == []  # B went with A's forward
    r.kv_caches = pools
    monkeypatch.setattr(M, "SHORT_PREFILL_POSITIONS", 0)
    assert torch.equal(got, r.hidden_states([a, b], 0))
