"""bench/pack_ab.py: the K pool switched between the layouts mid-generation keeps the tokens, and a small run
end to end prints its table."""

import pytest

from conftest import load_bench
from etr.kernels import cpu_paged_decode as K


@pytest.fixture(scope="module")
def packing():
    if not (K.available() and K.bf16_path(32)):
        pytest.skip("packed K pages are read by the op's bf16 path, which needs a CPU with AVX512-BF16")


def test_switching_layouts_mid_generation_keeps_the_tokens(packing, tiny_dir):
    from etr import LLM, SamplingParams
    bench = load_bench("pack_ab")
    path = str(tiny_dir("qwen2_tied_hd32"))
    prompts = [list(range(10, 40)), [9] * 20]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(path, dtype="bfloat16")
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.engine
    seqs = [engine.add_request(p, params) for p in prompts]
    steps = 0
    while not all(s.is_finished for s in seqs):
        bench.set_layout(engine.runner, steps % 2 == 0)  # rows, packed, rows, ... between steps
        assert engine.runner.kv_caches[0][0].dim() == (5 if steps % 2 == 0 else 4)
        engine.step()
        steps += 1
    assert [s.output_token_ids for s in seqs] == want


def test_a_small_run_prints_its_table(packing, tiny_dir, capsys):
    bench = load_bench("pack_ab")
    assert bench.main(["--model", str(tiny_dir("qwen2_tied_hd32")), "--points", "2x20", "--rounds", "2",
                       "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 20 |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 9
