"""bench/knob_ab.py: the GEMM's prefetch switched mid-generation keeps the tokens, and a small run end to end
prints its table, for it and for the argmax op (the pack_k knob: tests/test_pack_ab_bench.py)."""

import pytest

from conftest import load_bench
from etr.kernels import cpu_bf16_linear


@pytest.fixture(scope="module")
def gemm():
    if not cpu_bf16_linear.available():
        pytest.skip(f"the package's bf16 GEMM is not the one used here: {cpu_bf16_linear.load_error()}")


@pytest.mark.parametrize("switch", ["set_gemm_prefetch", "set_one_walk"])
def test_switching_the_prefetch_mid_generation_keeps_the_tokens(gemm, tiny_dir, switch):
    """The GEMM's prefetch, or its one walk of up to 12 rows, switched at every step keeps the greedy tokens."""
    from etr import LLM, SamplingParams
    bench = load_bench("knob_ab")
    knob = getattr(bench, switch)
    # 14 rows: two tiles a block (8 + 6), so the next-block prefetch acts; the one walk changes the plan there
    prompts = [list(range(10 + i, 40 + i)) for i in range(14)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = LLM(str(tiny_dir("qwen2_tied_hd32")), dtype="bfloat16")
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.engine
    seqs = [engine.add_request(p, params) for p in prompts]
    steps = 0
    try:
        while not all(s.is_finished for s in seqs):
            knob(steps % 2 == 0)
            engine.step()
            steps += 1
    finally:
        knob(True)
    assert [s.output_token_ids for s in seqs] == want


def test_set_prefetch_returns_the_previous_setting(gemm):
    from etr.kernels import cpu_decode_step
    for op in [cpu_bf16_linear] + ([cpu_decode_step] if cpu_decode_step.available() else []):
        before = op.set_prefetch(False)
        try:
            assert op.set_prefetch(True) is False
            assert op.set_prefetch(True) is True
        finally:
            op.set_prefetch(before)


def test_a_small_run_prints_its_table(gemm, tiny_dir, capsys):
    bench = load_bench("knob_ab")
    assert bench.main(["--knob", "gemm_prefetch", "--model", str(tiny_dir("qwen2_tied_hd32")), "--points", "6x20",
                       "--rounds", "2", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 6 | 20 |")]
    assert "knob gemm_prefetch" in out and len(rows) == 1 and len(rows[0].split("|")) == 9
    assert cpu_bf16_linear.set_prefetch(True) is True  # the run leaves it on, in both ops
    from etr.kernels import cpu_decode_step
    if cpu_decode_step.available():
        assert cpu_decode_step.set_prefetch(True) is True


def test_the_argmax_knob_prints_its_table(tiny_dir, capsys):
    from etr.kernels import cpu_argmax
    if not cpu_argmax.available():
        pytest.skip(f"the argmax op is not built here: {cpu_argmax.load_error()}")
    bench = load_bench("knob_ab")
    assert bench.main(["--knob", "cpu_argmax", "--model", str(tiny_dir("qwen2_tied_hd32")), "--points", "3x20",
                       "--rounds", "2", "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 | 20 |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 9


def test_switching_the_step_region_mid_generation_keeps_the_tokens(gemm, tiny_dir, capsys):
    """The region is the same bits as one op a linear (tests/test_cpu_decode_step.py): a greedy batch of 3
    switched at every step keeps its tokens, and the region ran on the steps it was on. Then the knob's table."""
    import torch
    from etr import LLM, SamplingParams
    bench = load_bench("knob_ab")
    path = str(tiny_dir("llama_tied_gqa"))  # no biases: the region's models
    prompts = [list(range(10 + i, 30 + 7 * i)) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = LLM(path, dtype="bfloat16")
    if bench.step_region_missing(llm.engine):
        pytest.skip(bench.step_region_missing(llm.engine))
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.engine
    seqs = [engine.add_request(p, params) for p in prompts]
    steps, took = 0, []
    try:
        while not all(s.is_finished for s in seqs):
            bench.set_step_region(steps % 2 == 0)
            before = torch.ops.etr_cpu_step.region_steps()
            engine.step()
            took.append(torch.ops.etr_cpu_step.region_steps() - before)
            steps += 1
    finally:
        bench.set_step_region(True)
    assert [s.output_token_ids for s in seqs] == want
    # The first step prefills (in the region or not, by its rows after the prefix cache's hits); every decode
    # step after it took the path asked for.
    assert steps > 2 and took[1:] == [int(i % 2 == 0) for i in range(1, steps)]
    assert bench.main(["--knob", "step_region", "--model", path, "--points", "2x20", "--rounds", "2",
                       "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 20 |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 9
    assert torch.ops.etr_cpu_step.set_region(True) is True  # the run leaves it on


def test_switching_huge_pages_mid_generation_keeps_the_tokens(gemm, tiny_dir, capsys):
    """The weights on huge pages or on torch's pages are the same bits: a greedy batch switched at every step
    keeps its tokens, and each side's linears and step op read their own copy. Then the knob's table."""
    from etr import LLM, SamplingParams
    bench = load_bench("knob_ab")
    path = str(tiny_dir("llama_tied_gqa"))
    prompts = [list(range(10 + i, 30 + 7 * i)) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = LLM(path, dtype="bfloat16")
    if bench.huge_pages_missing(llm.engine) or llm.engine.runner.native_step is None:
        pytest.skip(bench.huge_pages_missing(llm.engine) or "the decode-step op is not built here")
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.engine
    huge = engine.runner.model.head_proj.packed
    seqs = [engine.add_request(p, params) for p in prompts]
    steps = 0
    while not all(s.is_finished for s in seqs):
        bench.set_huge_pages(engine, steps % 2 == 0)
        on = steps % 2 == 0
        assert (engine.runner.model.head_proj.packed is huge) is on
        assert all((w.untyped_storage().data_ptr() == huge.untyped_storage().data_ptr()) is on
                   for w in engine.runner.native_step.weights[1::6])
        engine.step()
        steps += 1
    bench.set_huge_pages(engine, True)
    assert [s.output_token_ids for s in seqs] == want
    assert bench.main(["--knob", "huge_pages", "--model", path, "--points", "2x20", "--rounds", "2",
                       "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 20 |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 9


def test_switching_the_kv_pool_mid_generation_keeps_the_tokens(tiny_dir, capsys):
    """The KV moves whole between a pool on huge pages and the engine's own on torch's pages: a greedy batch
    switched at every step keeps its tokens, and each side's layers read their own pool. Then the knob's table."""
    from etr import LLM, SamplingParams
    from etr.kernels import huge_pages
    bench = load_bench("knob_ab")
    path = str(tiny_dir("llama_tied_gqa"))
    prompts = [list(range(10 + i, 30 + 7 * i)) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = LLM(path, dtype="bfloat16", num_kv_blocks=64)
    if bench.huge_kv_missing(llm.engine):
        pytest.skip(bench.huge_kv_missing(llm.engine))
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.engine
    seqs = [engine.add_request(p, params) for p in prompts]
    steps = 0
    while not all(s.is_finished for s in seqs):
        on = steps % 2 == 0
        bench.set_huge_kv(engine, on)
        runner = engine.runner
        assert runner.kv_pool is bench.KV_POOLS[engine][on] and runner.kv_caches is runner.pool_layers
        assert all(k.untyped_storage().data_ptr() == runner.kv_pool.untyped_storage().data_ptr()
                   for k, _ in runner.kv_caches)
        engine.step()
        steps += 1
    bench.set_huge_kv(engine, False)
    assert [s.output_token_ids for s in seqs] == want
    assert bench.KV_POOLS[engine][True].data_ptr() % huge_pages.huge_page_size() == 0
    assert bench.main(["--knob", "huge_kv", "--model", path, "--points", "2x20", "--rounds", "2",
                       "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 20 |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 9


def test_switching_the_stream_hint_mid_generation_keeps_the_tokens(gemm, tiny_dir, capsys):
    """The non-temporal hint changes no bit: a greedy batch of 7 (the step's region and the linear op's tiles
    that walk a block once, streaming or fetching the next block) switched at every step keeps its tokens. Then
    the knob's table, and both ops left on."""
    from etr import LLM, SamplingParams
    from etr.kernels import cpu_decode_step
    bench = load_bench("knob_ab")
    path = str(tiny_dir("llama_tied_gqa"))
    prompts = [list(range(10 + i, 30 + 7 * i)) for i in range(7)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = LLM(path, dtype="bfloat16")
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.engine
    seqs = [engine.add_request(p, params) for p in prompts]
    steps = 0
    try:
        while not all(s.is_finished for s in seqs):
            bench.set_stream_hint(steps % 2 == 0)
            engine.step()
            steps += 1
    finally:
        bench.set_stream_hint(True)
    assert [s.output_token_ids for s in seqs] == want
    assert bench.main(["--knob", "stream_hint", "--model", path, "--points", "2x20", "--rounds", "2",
                       "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 20 |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 9
    assert cpu_bf16_linear.set_stream_hint(True) is True
    if cpu_decode_step.available():
        assert cpu_decode_step.set_stream_hint(True) is True


def test_switching_the_values_stream_mid_generation_keeps_the_tokens(tiny_dir, capsys):
    """The values pass streaming its own V rows changes no bit: a greedy batch of 3 with contexts past the
    stream's reach (64 positions) switched at every step keeps its tokens. Then the knob's table, left on."""
    from etr import LLM, SamplingParams
    from etr.kernels import cpu_paged_decode
    bench = load_bench("knob_ab")
    path = str(tiny_dir("qwen2_tied_hd32"))  # head size 32: the op's bf16 path
    prompts = [[(7 * i + 3 * j) % 250 + 1 for j in range(90 + 60 * i)] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(path, dtype="bfloat16")
    if bench.v_stream_missing(llm.engine):
        pytest.skip(bench.v_stream_missing(llm.engine))
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.engine
    seqs = [engine.add_request(p, params) for p in prompts]
    steps, before = 0, cpu_paged_decode.set_values_stream(True)
    try:
        while not all(s.is_finished for s in seqs):
            bench.set_values_stream(steps % 2 == 0)
            engine.step()
            steps += 1
        assert [s.output_token_ids for s in seqs] == want
        assert bench.main(["--knob", "v_stream", "--model", path, "--points", "2x100", "--rounds", "2",
                           "--steps", "1"]) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 100 |")]
        assert len(rows) == 1 and len(rows[0].split("|")) == 9
        assert cpu_paged_decode.set_values_stream(True) is True  # the run leaves it on
    finally:
        cpu_paged_decode.set_values_stream(before)
