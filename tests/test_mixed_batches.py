"""Mixed steps: requests that arrive while others decode are prefilled in the same forward as those decodes,
with every attention backend, and the tokens stay HF's (float32 greedy)."""

import sys

import pytest
import torch

import fake_flash_attn
from conftest import hf_greedy
from etr import LLM, SamplingParams
from etr.engine.block_manager import BlockManager
from etr.engine.scheduler import Scheduler
from etr.engine.sequence import Sequence
from etr.errors import ConfigError

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
FIRST = [(5 * i) % 250 + 1 for i in range(21)]
# Arrive while FIRST decodes: one shares FIRST's first 16 tokens (a prefix-cache hit inside a mixed step).
LATER = [FIRST[:16] + [9, 8, 7], [3, 4], [(11 * i) % 250 + 1 for i in range(40)]]


def record_steps(engine) -> list[tuple[int, int]]:
    """Wrap the runner so that every step's (number of sequences, number of decodes) is recorded."""
    steps, hidden = [], engine.runner.hidden_states

    def recorded(seqs, num_decodes):
        steps.append((len(seqs), num_decodes))
        return hidden(seqs, num_decodes)
    engine.runner.hidden_states = recorded
    return steps


def run_staggered(llm) -> list[list[int]]:
    """FIRST alone for two steps, then LATER joins; every sequence to its end."""
    engine = llm.engine
    seqs = [engine.add_request(FIRST, GREEDY)]
    engine.step(), engine.step()
    seqs += [engine.add_request(p, GREEDY) for p in LATER]
    for _ in range(100):
        if not engine.has_unfinished():
            break
        engine.step()
    assert engine.all_free()
    return [s.output_token_ids for s in seqs]


@pytest.mark.parametrize("backend", ["torch", "triton", "flash"])
def test_mixed_step_keeps_hf_greedy_tokens(backend, tiny_dir, hf_model_of, monkeypatch):
    if backend == "flash":
        monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn)
    path = tiny_dir("llama_tied_gqa")
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, attention_backend=backend, mixed_batches=True,
              block_size=256 if backend == "flash" else 8)
    assert llm.engine.runner.backend.name == backend
    steps = record_steps(llm.engine)
    got = run_staggered(llm)
    # The third step decodes FIRST and prefills all of LATER in one forward.
    assert steps[:3] == [(1, 0), (1, 1), (4, 1)]
    hf = hf_model_of(path)
    assert got == [hf_greedy(hf, p, GREEDY.max_tokens) for p in [FIRST] + LATER]


def test_unmixed_steps_prefill_first_and_are_the_cpu_default(tiny_dir):
    path = str(tiny_dir("llama_tied_gqa"))
    llm = LLM(path, dtype="float32", num_kv_blocks=64)
    assert not llm.engine.scheduler.mixed_batches and llm.config.mixed_batches_for(torch.device("cuda"))
    steps = record_steps(llm.engine)
    unmixed = run_staggered(llm)
    assert steps[:4] == [(1, 0), (1, 1), (3, 0), (4, 4)]
    assert all(d in (0, n) for n, d in steps)
    assert unmixed == run_staggered(LLM(path, dtype="float32", num_kv_blocks=64, mixed_batches=True))
    with pytest.raises(ConfigError, match="mixed_batches='yes' must be True, False or None"):
        LLM(path, mixed_batches="yes")


def scheduler(num_blocks: int, budget: int = 100) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4, enable_prefix_caching=False), max_num_seqs=8,
                     max_num_batched_tokens=budget)


def admitted(sched: Scheduler, *lengths: int) -> list[Sequence]:
    """Sequences of these prompt lengths, prefilled and each given one output token."""
    seqs = [Sequence(list(range(1, n + 1)), GREEDY, 4) for n in lengths]
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == (seqs, 0)
    for s in seqs:
        s.append(1)
    return seqs


def test_mixed_step_respects_the_token_budget():
    sched = scheduler(64, budget=30)
    running = admitted(sched, 3, 3)
    waiting = [Sequence(list(range(1, 13)), GREEDY, 4) for _ in range(3)]
    for s in waiting:
        sched.add(s)
    # 2 decode tokens + 12 + 12 fit in 30; a third prompt would not.
    assert sched.schedule() == (running + waiting[:2], 2)


def test_no_prefill_joins_a_step_that_preempted():
    sched = scheduler(3)
    running = admitted(sched, 4, 4)  # 2 blocks; each decode now needs a new block, and 1 is free
    late = Sequence([1, 2], GREEDY, 4)
    sched.add(late)
    seqs, num_decodes = sched.schedule()
    assert (seqs, num_decodes) == ([running[0]], 1) and sched.num_preemptions == 1
    assert list(sched.waiting) == [running[1], late]
