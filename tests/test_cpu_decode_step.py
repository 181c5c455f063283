"""The CPU decode step as one C++ op (kernels/cpu_decode_step.cpp) against the model's own forward. With the
ATen glue: the same ATen ops in the same order, so the hidden states and the KV pages it writes must be the
same bits (no tolerance), for Llama (llama3 rope; biases on every linear) and Qwen2 (q/k/v biases), tied and
untied, GQA and MHA, float32 and bf16 (plain and oneDNN-prepacked linears, and the package's bf16 GEMM); with
the raw glue (bf16): within the tolerance its test states, on those models and one of awkward sizes. The engine
takes the op for CPU decode steps, with tokens equal to the forward's (ATen glue)."""

import pytest
import torch
from conftest import require_cpp_op

from etr.engine.attention.torch_backend import write_slots
from etr.engine.config import EngineConfig
from etr.engine.model_runner import ModelRunner
from etr.engine.sampling_params import SamplingParams
from etr.engine.sequence import Sequence
from etr.kernels import cpu_decode_step as K
from etr.kernels.cpu_gemm import PackedBf16Linear, packed_bf16_available


@pytest.fixture(scope="module")
def op():
    require_cpp_op(K, "CPU decode-step op")


def packed_k(r, dtype) -> bool:
    """Whether the runner's pools should hold packed K: bf16, a head size of the op's bf16 path (here 32: the
    head-size-32 models), on a CPU with AVX512-BF16."""
    from etr.kernels import cpu_paged_decode
    return dtype == torch.bfloat16 and r.config.head_dim % 32 == 0 and cpu_paged_decode.bf16_path(r.config.head_dim)


def runner(path, dtype, linears, monkeypatch, glue="aten", max_model_len=256, kv_blocks=64):
    """A runner whose linears are plain, oneDNN-prepacked or packed for the package's own bf16 GEMM, whatever
    this CPU would pick, and whose step takes ``glue`` where it can."""
    import etr.engine.model_runner as M
    monkeypatch.setenv("ETR_CPU_STEP_GLUE", glue)
    from etr.kernels import cpu_bf16_linear
    packed = linears != "plain"
    if packed and not packed_bf16_available():
        pytest.skip("this torch build cannot prepack bf16 weights for oneDNN")
    if linears == "etr" and not cpu_bf16_linear.available():
        pytest.skip(f"the package's bf16 linear is not for this CPU: {cpu_bf16_linear.load_error()}")
    if linears == "onednn":
        monkeypatch.setattr(cpu_bf16_linear, "available", lambda: False)
    monkeypatch.setattr(M, "wants_fp32_gemm", lambda *a: False)
    monkeypatch.setattr(M, "wants_packed_bf16", lambda *a: packed)
    r = ModelRunner(EngineConfig(model=str(path), dtype=dtype, max_model_len=max_model_len, max_num_seqs=8),
                    str(path), torch.device("cpu"))
    assert any(isinstance(m, PackedBf16Linear) for m in r.model.modules()) == packed
    r.allocate_kv(kv_blocks)
    return r


def prefilled(r, lengths, g):
    """Sequences of random tokens, prefilled through the model, with their next token appended."""
    seqs, block = [], 0
    for n in lengths:
        seq = Sequence(torch.randint(3, r.config.vocab_size, (n,), generator=g).tolist(), SamplingParams(),
                       r.block_size)
        blocks = -(-(n + 1) // r.block_size)
        seq.block_table = list(range(block + blocks - 1, block - 1, -1))  # scattered: reversed
        block += blocks
        seqs.append(seq)
    r.hidden_states(seqs, 0)
    for seq in seqs:
        seq.token_ids.append(int(torch.randint(3, r.config.vocab_size, (1,), generator=g)))
    return seqs


@pytest.fixture(scope="module")
def llama_all_biases(tmp_path_factory):
    """Biases on every linear (q/k/v, o, gate/up, down), made non-zero: the op's four bias slots all used."""
    from conftest import make_tiny_checkpoint
    from transformers import AutoModelForCausalLM
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("biases"), "llama", hidden_size=64, num_attention_heads=4,
                                num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["llama_tied_gqa", "llama_untied_hd48", "llama3_rope", "qwen2_untied",
                                  "qwen2_tied_hd32", "llama_all_biases"])
@pytest.mark.parametrize("dtype, linears", [(torch.float32, "plain"), (torch.bfloat16, "plain"),
                                            (torch.bfloat16, "onednn"), (torch.bfloat16, "etr")])
@pytest.mark.parametrize("lengths", [[1, 17, 5, 40], [23]], ids=["batch4", "batch1"])
def test_step_is_the_forward_bit_for_bit(op, tiny_dir, llama_all_biases, monkeypatch, name, dtype, linears, lengths):
    r = runner(llama_all_biases if name == "llama_all_biases" else tiny_dir(name), dtype, linears, monkeypatch)
    if name == "llama_all_biases":
        assert all(b is not None for b in r.native_step.biases)
    assert r.native_step is not None and r.native_step.kind == linears and r.native_step.glue == "aten"
    assert r.kv_caches[0][0].dim() == (5 if packed_k(r, dtype) else 4)  # head size 32 in bf16: K packed
    seqs = prefilled(r, lengths, torch.Generator().manual_seed(len(name)))
    ids, positions, meta = r.prepare_decode(seqs)
    r.backend.prepare(meta)
    assert meta.extra.get("in_place")
    pools = [(k.clone(), v.clone()) for k, v in r.kv_caches]
    with torch.inference_mode():
        want = r.model(ids, positions, meta, pools, r.backend)
    got = r.native_step(ids, positions, meta, r.kv_caches)
    assert got.dtype == want.dtype and torch.equal(got, want)
    # As bytes: the pools' unwritten slots hold whatever memory they were given (NaN != NaN).
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for (k, v), (k2, v2) in zip(r.kv_caches, pools) for a, b in ((k, k2), (v, v2)))


def test_engine_decodes_through_the_step_with_the_forwards_tokens(op, tiny_dir, monkeypatch):
    from etr import LLM
    monkeypatch.setenv("ETR_CPU_STEP_GLUE", "aten")  # the forward's bits (the raw glue is tested within a tolerance)
    path = str(tiny_dir("qwen2_untied"))
    prompts = [[5, 6, 7], list(range(10, 50)), [9] * 20]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    import etr.engine.model_runner as M
    monkeypatch.setattr(M, "wants_fp32_gemm", lambda *a: False)  # CPUs without native bf16 would keep fp32 copies
    monkeypatch.setattr(M, "SHORT_PREFILL_POSITIONS", 0)  # prefills by the forward (tests/test_short_prefill.py)
    calls = []
    step = K.DecodeStep.__call__
    monkeypatch.setattr(K.DecodeStep, "__call__", lambda self, *a: calls.append(1) or step(self, *a))
    native = [o.token_ids for o in LLM(path, dtype="bfloat16").generate(prompts, params, use_tqdm=False)]
    assert len(calls) == 11  # every decode step of the batch (the first token comes from the prefill)
    monkeypatch.setenv("ETR_CPU_DECODE_STEP", "0")
    monkeypatch.setattr(K, "OP", K.CppOp("cpu_decode_step.cpp", "CPU decode-step op", "ETR_CPU_DECODE_STEP"))
    plain = LLM(path, dtype="bfloat16")
    assert plain.engine.runner.native_step is None
    assert [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)] == native
    assert len(calls) == 11 and K.load_error() == "turned off by ETR_CPU_DECODE_STEP=0"


def test_a_model_it_cannot_run_keeps_the_forward(op, tiny_dir, monkeypatch):
    from etr.kernels.cpu_gemm import use_fp32_gemm
    r = runner(tiny_dir("llama_tied_gqa"), torch.bfloat16, "plain", monkeypatch)
    assert K.DecodeStep.for_model(r.model) is not None
    use_fp32_gemm(r.model)  # a CPU without native bf16: its linears keep float32 copies
    assert K.DecodeStep.for_model(r.model) is None
    r = runner(tiny_dir("llama_tied_gqa"), torch.float32, "plain", monkeypatch)
    r.model.use_fused_ops()  # the Triton ops
    assert K.DecodeStep.for_model(r.model) is None


@pytest.fixture(scope="module")
def raw(op):
    if not torch.ops.etr_cpu_step.raw_glue():
        pytest.skip("the step op's raw glue needs a build with AVX-512 (F, BW, VL)")


@pytest.fixture(scope="module")
def llama_awkward(tmp_path_factory):
    """Sizes off the raw loops' 16 lanes: hidden 136, head size 34 (rotary halves of 17), intermediate 1,100 (its
    SiLU-mul runs on two threads from 15 rows)."""
    from conftest import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("awkward"), "llama", hidden_size=136, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=1100)


@pytest.mark.parametrize("name", ["llama_tied_gqa", "llama_untied_hd48", "llama3_rope", "qwen2_untied",
                                  "qwen2_tied_hd32", "llama_all_biases", "llama_awkward"])
@pytest.mark.parametrize("linears", ["plain", "onednn", "etr"])
@pytest.mark.parametrize("lengths", [[1, 17, 5, 40, 9, 30, 12, 3, 60, 2, 33, 8, 21, 4, 15, 44], [23]],
                         ids=["batch16", "batch1"])
def test_raw_glue_is_the_forward_within_bf16_rounding(raw, tiny_dir, llama_all_biases, llama_awkward, monkeypatch,
                                                       name, linears, lengths):
    """The raw glue rounds to bf16 where ATen does, but its norm adds the squares in its own order and SiLU's
    exp is its own, so a value may land one bf16 step away and move what follows: hidden states and the KV
    written within 1e-2 absolute and relative (a bf16 step is 2**-8 relative), and at least 95 % of the hidden
    states the forward's bits (a glue that skipped one of ATen's roundings would move far more of them)."""
    path = {"llama_all_biases": llama_all_biases, "llama_awkward": llama_awkward}.get(name) or tiny_dir(name)
    r = runner(path, torch.bfloat16, linears, monkeypatch, glue="raw")
    assert r.native_step.glue == "raw"
    assert r.kv_caches[0][0].dim() == (5 if packed_k(r, torch.bfloat16) else 4)
    seqs = prefilled(r, lengths, torch.Generator().manual_seed(len(name)))
    ids, positions, meta = r.prepare_decode(seqs)
    r.backend.prepare(meta)
    pools = [(k.clone(), v.clone()) for k, v in r.kv_caches]
    with torch.inference_mode():
        want = r.model(ids, positions, meta, pools, r.backend)
    nan = torch.full((len(meta.slot_mapping), r.config.num_key_value_heads, r.config.head_dim), float("nan"),
                     dtype=torch.bfloat16)
    for pages in (p for kv in r.kv_caches for p in kv):  # the rows this step writes, cleared: the step must
        write_slots(pages, meta.slot_mapping, nan)  # write them (freed memory may hold them already)
    got = r.native_step(ids, positions, meta, r.kv_caches)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    assert (got == want).float().mean() >= 0.95
    for (k, v), (k2, v2) in zip(r.kv_caches, pools):
        torch.testing.assert_close(k, k2, atol=1e-2, rtol=1e-2, equal_nan=True)
        torch.testing.assert_close(v, v2, atol=1e-2, rtol=1e-2, equal_nan=True)


def test_glue_choice(op, tiny_dir, monkeypatch):
    """bf16 models take the raw glue where the op has it, float32 ones the ATen glue; ETR_CPU_STEP_GLUE=aten
    keeps the ATen glue and another value is refused by name."""
    raw = torch.ops.etr_cpu_step.raw_glue()
    assert K.glue_for(torch.bfloat16) == ("raw" if raw else "aten") and K.glue_for(torch.float32) == "aten"
    monkeypatch.setenv("ETR_CPU_STEP_GLUE", "aten")
    assert K.glue_for(torch.bfloat16) == "aten"
    monkeypatch.setenv("ETR_CPU_STEP_GLUE", "fast")
    with pytest.raises(ValueError, match="ETR_CPU_STEP_GLUE='fast': expected one of"):
        K.glue_for(torch.bfloat16)


@pytest.fixture()
def region(raw):
    """The step's region (one parallel region a layer at 1-64 rows) where this build has it; its setting restored
    after."""
    from etr.kernels import cpu_bf16_linear
    if not cpu_bf16_linear.available():
        pytest.skip(f"the step's region runs the package's bf16 GEMM: {cpu_bf16_linear.load_error()}")
    before = torch.ops.etr_cpu_step.set_region(True)
    yield torch.ops.etr_cpu_step.set_region
    torch.ops.etr_cpu_step.set_region(before)


@pytest.fixture()
def threads():
    """Sets torch's thread count for a test (more than this machine's cores is allowed) and restores it."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.fixture()
def watchdog():
    """A hang in the region's spinning waits would stall the whole run: SIGALRM (no handler) ends the process."""
    import signal
    signal.alarm(300)
    yield
    signal.alarm(0)


@pytest.mark.parametrize("name", ["llama_untied_hd48", "llama3_rope", "llama_awkward"])
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("lengths", [[23], [300], [9, 30], [1, 17, 5, 40], [3, 8, 1, 20, 7],
                                     [4 + 5 * i for i in range(12)], [1 + 2 * i for i in range(13)],
                                     [2 + 3 * i for i in range(16)], [1 + (7 * i) % 45 for i in range(64)]],
                         ids=["batch1-attention-in-region", "batch1-attention-between", "batch2", "batch4",
                              "batch5-glue-split", "batch12-one-tile", "batch13-two-tiles", "batch16", "batch64"])
def test_the_steps_region_is_one_op_a_linear_bit_for_bit(region, threads, watchdog, tiny_dir, llama_awkward,
                                                          monkeypatch, name, lengths, count):
    """The region runs the linear op's tiles over the same blocks and the same glue, whichever thread takes a
    block: its hidden states and the KV it writes are the same bits as one op a linear, at 1-64 rows (the glue
    on the first thread at 1-4, split over the threads from 5), with the attention in the region (one short
    context) or between two regions, on 2 and 3 threads; with K pages packed
    (head size 32), partial blocks of outputs (the awkward sizes: 272 q/k/v outputs) and neither. Four runs each,
    since which thread takes which block changes from run to run, one of them with the tiles' prefetch of the
    next block off and one with the GEMM's one walk of up to 12 rows off."""
    path = llama_awkward if name == "llama_awkward" else tiny_dir(name)
    r = runner(path, torch.bfloat16, "etr", monkeypatch, glue="raw", max_model_len=512, kv_blocks=256)
    assert r.kv_caches[0][0].dim() == (5 if packed_k(r, torch.bfloat16) else 4)
    seqs = prefilled(r, lengths, torch.Generator().manual_seed(sum(lengths)))
    ids, positions, meta = r.prepare_decode(seqs)
    r.backend.prepare(meta)
    nan = torch.full((len(meta.slot_mapping), r.config.num_key_value_heads, r.config.head_dim), float("nan"),
                     dtype=torch.bfloat16)
    for pages in (p for kv in r.kv_caches for p in kv):  # this step's rows cleared: freed memory may hold them
        write_slots(pages, meta.slot_mapping, nan)
    before = [(k.clone(), v.clone()) for k, v in r.kv_caches]
    threads(count)
    outs, pools = [], []
    from etr.kernels import cpu_decode_step
    from etr.kernels import cpu_bf16_linear
    # the tiles' prefetch off once, and their one walk of up to 12 rows off once (in both ops)
    for on, fetch, walk in ((False, True, True), (True, True, True), (True, False, True), (True, True, False),
                            (True, True, True)):
        for (k, v), (k0, v0) in zip(r.kv_caches, before):
            k.copy_(k0)
            v.copy_(v0)
        region(on)
        steps = torch.ops.etr_cpu_step.region_steps()
        was = (cpu_decode_step.set_prefetch(fetch), cpu_decode_step.set_one_walk(walk),
               cpu_bf16_linear.set_one_walk(walk))
        try:
            outs.append(r.native_step(ids, positions, meta, r.kv_caches))
        finally:
            cpu_decode_step.set_prefetch(was[0])
            cpu_decode_step.set_one_walk(was[1])
            cpu_bf16_linear.set_one_walk(was[2])
        assert torch.ops.etr_cpu_step.region_steps() == steps + on  # the path asked for is the one that ran
        pools.append([(k.clone(), v.clone()) for k, v in r.kv_caches])
    for out, pool in zip(outs[1:], pools[1:]):
        assert torch.equal(outs[0].view(torch.int16), out.view(torch.int16))
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for (k, v), (k2, v2) in zip(pools[0], pool) for a, b in ((k, k2), (v, v2)))
    assert any(not torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # the step did write this step's KV
               for (k, v), (k2, v2) in zip(pools[1], before) for a, b in ((k, k2), (v, v2)))


def test_an_error_inside_the_region_is_raised_not_hung(region, threads, watchdog, tiny_dir, monkeypatch):
    """The attention of one short context runs inside the region, on its first thread; what it refuses there
    (a context length of 0) comes back as the op's error while the other threads stop, and the next step, with
    the same sizes and threads, runs in the region."""
    r = runner(tiny_dir("llama_untied_hd48"), torch.bfloat16, "etr", monkeypatch, glue="raw")
    seqs = prefilled(r, [23], torch.Generator().manual_seed(0))
    ids, positions, meta = r.prepare_decode(seqs)
    r.backend.prepare(meta)
    threads(2)
    lens = meta.context_lens
    meta.context_lens = torch.zeros_like(lens)
    with pytest.raises(RuntimeError, match=r"context_lens\[0\] = 0 \(must be >= 1\)"):
        r.native_step(ids, positions, meta, r.kv_caches)
    meta.context_lens = lens
    steps = torch.ops.etr_cpu_step.region_steps()
    assert torch.isfinite(r.native_step(ids, positions, meta, r.kv_caches).float()).all()
    assert torch.ops.etr_cpu_step.region_steps() == steps + 1


def test_raw_glue_refuses_float32_by_name(raw, tiny_dir, monkeypatch):
    r = runner(tiny_dir("llama_tied_gqa"), torch.float32, "plain", monkeypatch)
    seqs = prefilled(r, [5], torch.Generator().manual_seed(0))
    ids, positions, meta = r.prepare_decode(seqs)
    r.backend.prepare(meta)
    r.native_step.glue = "raw"
    with pytest.raises(RuntimeError, match="the raw glue is for bf16 models, not Float"):
        r.native_step(ids, positions, meta, r.kv_caches)


def test_raw_glue_checks_every_slot_before_it_writes(raw, tiny_dir, monkeypatch):
    from etr.kernels import cpu_bf16_linear
    r = runner(tiny_dir("llama_tied_gqa"), torch.bfloat16, "etr" if cpu_bf16_linear.available() else "plain",
               monkeypatch, glue="raw")
    seqs = prefilled(r, [5, 9], torch.Generator().manual_seed(0))
    ids, positions, meta = r.prepare_decode(seqs)
    r.backend.prepare(meta)
    capacity = r.kv_caches[0][1].numel() // r.kv_caches[0][1][0, 0].numel()
    meta.slot_mapping = torch.tensor([int(meta.slot_mapping[0]), capacity])
    pools = [(k.clone(), v.clone()) for k, v in r.kv_caches]
    with pytest.raises(RuntimeError, match=f"slot {capacity} of row 1 is outside the KV pool of {capacity} slots"):
        r.native_step(ids, positions, meta, r.kv_caches)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # row 0's valid slot was not written either
               for (k, v), (k2, v2) in zip(r.kv_caches, pools) for a, b in ((k, k2), (v, v2)))


@pytest.mark.parametrize("glue", ["aten", "raw"])
def test_a_packed_k_pool_of_another_shape_is_refused_before_anything_is_written(op, tiny_dir, monkeypatch, glue):
    """Packed K pages whose heads or head size are not the model's (same bytes, another shape) are named, and no
    pool is written: the step would otherwise scatter one layer's keys in the wrong layout."""
    if glue == "raw" and not torch.ops.etr_cpu_step.raw_glue():
        pytest.skip("the step op's raw glue needs a build with AVX-512 (F, BW, VL)")
    r = runner(tiny_dir("qwen2_tied_hd32"), torch.bfloat16, "plain", monkeypatch, glue=glue)
    if not packed_k(r, torch.bfloat16):
        pytest.skip("packed K pages need the op's bf16 path (a CPU with AVX512-BF16)")
    seqs = prefilled(r, [5, 9], torch.Generator().manual_seed(0))
    ids, positions, meta = r.prepare_decode(seqs)
    r.backend.prepare(meta)
    k, v = r.kv_caches[1]
    n, kv, half, bs, _ = k.shape
    wrong = [kvs if i != 1 else (k.view(n, kv * 2, half // 2, bs, 2), v) for i, kvs in enumerate(r.kv_caches)]
    pools = [(a.clone(), b.clone()) for a, b in r.kv_caches]
    with pytest.raises(RuntimeError, match=r"layer 1's packed K pages \[.*\] expected beside V pages"):
        r.native_step(ids, positions, meta, wrong)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for (k, v), (k2, v2) in zip(r.kv_caches, pools) for a, b in ((k, k2), (v, v2)))
