"""Sampler: seeded reproducibility, top-k=1 == greedy, empirical frequencies match the softmax."""

import random

import pytest
import torch

from etr import LLM, SamplingParams
from etr.engine.sampler import Sampler, filter_logits
from etr.engine.sequence import Sequence


def make_seqs(n, **params):
    return [Sequence([1, 2, 3], SamplingParams(**params), 16) for _ in range(n)]


def empirical(logits, draws, **params):
    sampler = Sampler()
    seqs = make_seqs(draws, **params)
    tokens = sampler(logits.expand(draws, -1).clone(), seqs)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


# 20,000 draws: one standard error of a frequency is at most 0.0036, so 0.015 is > 4 sigma.
DRAWS, TOL = 20_000, 0.015
LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]])


def test_frequencies_match_softmax():
    torch.manual_seed(0)
    freq = empirical(LOGITS, DRAWS, temperature=0.7)
    assert (freq - (LOGITS[0] / 0.7).softmax(-1)).abs().max() < TOL


@pytest.mark.parametrize("params,keep", [
    (dict(top_k=3), [0, 6, 1]),
    (dict(top_p=0.6), [0, 6]),          # p = .33, .20, .12 ...: the first two reach 0.6 only with the third
    (dict(min_p=0.3), [0, 6, 1]),       # p/p_max >= 0.3: exp(-1) = .37 keeps logit 1.0, .22 drops 0.5
])
def test_filters_renormalise(params, keep):
    torch.manual_seed(1)
    probs = LOGITS[0].softmax(-1)
    if "top_p" in params:  # compute the top-p set by definition rather than trusting the comment
        order = probs.argsort(descending=True).tolist()
        cum, keep = 0.0, []
        for i in order:
            keep.append(i)
            cum += probs[i].item()
            if cum >= params["top_p"]:
                break
    want = torch.zeros_like(probs)
    want[keep] = probs[keep] / probs[keep].sum()
    freq = empirical(LOGITS, DRAWS, temperature=1.0, **params)
    assert (freq - want).abs().max() < TOL


def test_filter_logits_keeps_best_token_always():
    logits = torch.randn(5, 50)
    out = filter_logits(logits, torch.tensor([1] * 5), torch.tensor([1e-6] * 5), torch.tensor([1.0] * 5))
    assert torch.equal(out.argmax(-1), logits.argmax(-1))
    assert (out > float("-inf")).sum(-1).tolist() == [1] * 5


def test_top_k_1_equals_greedy(tiny_dir):
    llm = LLM(str(tiny_dir("qwen2_untied")), dtype="float32", num_kv_blocks=64)
    prompts = [[3, 4, 5], [9] * 20, [100, 7]]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    topk1 = llm.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


def test_seed_reproducible_across_batch_compositions(tiny_dir):
    llm = LLM(str(tiny_dir("llama_untied_hd48")), dtype="float32", num_kv_blocks=128)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=30, ignore_eos=True)
    prompt = [11, 22, 33, 44]
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    rng = random.Random(0)
    others = [[rng.randrange(256) for _ in range(rng.randrange(1, 40))] for _ in range(5)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=rng.randrange(5, 40), ignore_eos=True)
    batch = [others[0], others[1], prompt, others[2], others[3], others[4]]
    mixed = llm.generate(batch, [unseeded, unseeded, seeded, unseeded, seeded, unseeded], use_tqdm=False)
    assert mixed[2].token_ids == alone
    other_seed = llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=30,
                                                       ignore_eos=True), use_tqdm=False)[0].token_ids
    assert other_seed != alone  # the seed matters (30 draws from a diverse model: equal by chance ~never)
