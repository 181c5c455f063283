"""Block accounting: ref counts, prefix sharing, and preemption under a tiny pool."""

import random

from etr import LLM, SamplingParams
from etr.engine.block_manager import BlockManager
from etr.engine.sequence import Sequence


def seq_of(tokens, block_size=4):
    return Sequence(list(tokens), SamplingParams(max_tokens=8), block_size)


def test_shared_prefix_blocks_are_ref_counted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = seq_of(range(10)), seq_of(list(range(8)) + [50, 51, 52])
    bm.allocate(a)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.deallocate(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1
    bm.deallocate(b)
    assert bm.all_free()
    c = seq_of(range(9))  # revives the freed, still-hashed blocks
    bm.allocate(c)
    assert c.num_cached_tokens == 8


def test_different_prefix_same_block_tokens_not_shared():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9]), seq_of([0, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 0  # block 2 has equal tokens but another prefix: chained hash differs


def test_decode_appends_blocks_and_hashes_full_ones():
    bm = BlockManager(num_blocks=4, block_size=2)
    s = seq_of([1, 2, 3], block_size=2)
    bm.allocate(s)
    s.append(4)            # 4 tokens: fills block 1
    bm.may_append(s)
    assert len(s.block_table) == 2 and bm.blocks[s.block_table[1]].hash is not None
    s.append(5)            # 5 tokens: needs block 2
    assert bm.can_append(s)
    bm.may_append(s)
    assert len(s.block_table) == 3


def test_200_random_requests_with_tiny_pool_preempt_and_free_everything(tiny_dir):
    rng = random.Random(7)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 30), ignore_eos=True) for _ in prompts]
    path = str(tiny_dir("llama_tied_gqa"))
    roomy = LLM(path, dtype="float32", block_size=8, num_kv_blocks=2000, max_num_seqs=64)
    tight = LLM(path, dtype="float32", block_size=8, num_kv_blocks=20, max_num_seqs=64)
    want = roomy.generate(prompts, params, use_tqdm=False)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(len(o.token_ids) == p.max_tokens for o, p in zip(got, params))
    assert tight.engine.block_manager.all_free() and not tight.engine.has_unfinished()
