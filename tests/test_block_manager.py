"""Block accounting: ref counts, prefix sharing, and preemption under a tiny pool."""

import random

from etr import LLM, SamplingParams
from etr.engine import block_manager
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


def adjacent_share(tables):
    pairs = [(a, b) for t in tables for a, b in zip(t, t[1:])]
    return sum(b == a + 1 for a, b in pairs) / len(pairs)


def grow_in_lockstep(bm, seqs, blocks, rng):
    for _ in range(blocks * bm.block_size):
        for s in seqs:
            s.append(rng.randrange(1000))
            assert bm.can_append(s)
            bm.may_append(s)


def test_sequences_growing_together_keep_their_pages_in_order():
    # Least-recently-freed alone interleaves 16 sequences' pages (every neighbour another sequence's); the
    # decode attention reads pages in order faster, so each sequence grows into the block after its last.
    rng = random.Random(0)
    bm = BlockManager(num_blocks=16 * 48, block_size=4)
    seqs = [seq_of([rng.randrange(1000) for _ in range(5)]) for _ in range(16)]
    for s in seqs:
        bm.allocate(s)
    grow_in_lockstep(bm, seqs, 30, rng)
    assert adjacent_share([s.block_table for s in seqs]) >= 0.9
    assert len({b for s in seqs for b in s.block_table}) == sum(len(s.block_table) for s in seqs)


def test_pages_stay_in_order_in_a_pool_full_of_cached_prefixes():
    # The second batch finds every free block holding a recent prefix of the first: each is moved aside (one
    # copy) rather than evicted out of least-recently-freed order, or skipped (pages out of order).
    rng = random.Random(4)
    copies = []
    bm = BlockManager(num_blocks=16 * 40, block_size=4, copy_block=lambda src, dst: copies.append((src, dst)))
    for _ in range(2):
        seqs = [seq_of([rng.randrange(1000) for _ in range(9)]) for _ in range(16)]
        for s in seqs:
            bm.allocate(s)
        grow_in_lockstep(bm, seqs, 30, rng)
        assert adjacent_share([s.block_table for s in seqs]) >= 0.9
        for s in seqs:
            bm.deallocate(s)
    assert copies and bm.all_free()


def test_a_cached_prefix_in_the_way_moves_aside_and_still_revives(monkeypatch):
    monkeypatch.setattr(block_manager, "RUN_GAP", 0)  # a new sequence starts at a free run's first block
    copies = []
    bm = BlockManager(num_blocks=40, block_size=4, copy_block=lambda src, dst: copies.append((src, dst)))
    rng = random.Random(1)
    grower = seq_of([rng.randrange(1000) for _ in range(5)])   # blocks 0 and 1
    bm.allocate(grower)
    cached = seq_of(range(100, 113))                             # 13 tokens: three full blocks, hashed
    bm.allocate(cached)
    assert grower.block_table == [0, 1] and cached.block_table[0] == 2
    bm.deallocate(cached)                                        # newest frees: not spare, so they move
    grow_in_lockstep(bm, [grower], 3, rng)
    assert grower.block_table == [0, 1, 2, 3, 4]
    assert copies == [(2, 6), (3, 7), (4, 8)]  # into the least recently freed (block 5 held its partial 4th)
    again = seq_of(range(100, 113))
    bm.allocate(again)
    assert again.num_cached_tokens == 12
    assert again.block_table[:3] == [dst for _, dst in copies]


def test_without_copy_block_a_new_prefix_is_kept_and_growth_goes_elsewhere(monkeypatch):
    monkeypatch.setattr(block_manager, "RUN_GAP", 0)
    bm = BlockManager(num_blocks=40, block_size=4)
    rng = random.Random(2)
    grower = seq_of([rng.randrange(1000) for _ in range(5)])
    bm.allocate(grower)
    cached = seq_of(range(100, 113))
    bm.allocate(cached)
    assert cached.block_table[:3] == [2, 3, 4]
    bm.deallocate(cached)
    grow_in_lockstep(bm, [grower], 3, rng)
    assert not set(grower.block_table) & {2, 3, 4}
    again = seq_of(range(100, 113))
    bm.allocate(again)
    assert again.num_cached_tokens == 12 and again.block_table[:3] == [2, 3, 4]


def test_moved_prefixes_give_the_same_tokens(tiny_dir):
    # Float32 greedy: a prompt served from prefixes that were moved aside decodes as it did with no cache.
    rng = random.Random(3)
    path = str(tiny_dir("llama_tied_gqa"))
    shared = [rng.randrange(256) for _ in range(24)]
    prompts = [shared + [rng.randrange(256) for _ in range(rng.randrange(1, 9))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    cold = LLM(path, dtype="float32", block_size=4, num_kv_blocks=400, enable_prefix_caching=False)
    want = [o.token_ids for o in cold.generate(prompts, params, use_tqdm=False)]
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=400, max_num_seqs=4)
    bm = llm.engine.block_manager
    first = [o.token_ids for o in llm.generate(prompts[:1], params, use_tqdm=False)]
    got = first + [o.token_ids for o in llm.generate(prompts[1:], params, use_tqdm=False)]
    assert bm.moves > 0 and got == want
    assert llm.generate(prompts[:1], params, use_tqdm=False)[0].token_ids == want[0]
    assert bm.all_free()


def test_moved_prefixes_keep_their_place_in_the_eviction_order(monkeypatch):
    # P is freed before Q. After P's blocks move aside, P must still be evicted before Q.
    monkeypatch.setattr(block_manager, "RUN_GAP", 0)
    bm = BlockManager(num_blocks=40, block_size=4, copy_block=lambda src, dst: None)
    grower = seq_of(range(900, 905))
    p, q = seq_of(range(100, 113)), seq_of(range(200, 213))
    for s in (grower, p, q):
        bm.allocate(s)
    assert (grower.block_table, p.block_table[:3], q.block_table[:3]) == ([0, 1], [2, 3, 4], [6, 7, 8])
    bm.deallocate(p)
    bm.deallocate(q)
    grow_in_lockstep(bm, [grower], 3, random.Random(5))
    assert grower.block_table == [0, 1, 2, 3, 4]
    holder = {bm.blocks[b].token_ids[0]: b for b in bm.free if bm.blocks[b].token_ids}
    order = list(bm.free)
    assert order.index(holder[100]) < order.index(holder[200])
    assert [bm.freed_at[b] for b in order] == sorted(bm.freed_at[b] for b in order)


def test_cache_hits_always_find_their_prefix_under_random_load():
    # A model stand-in: each block's "KV" is the token prefix that ends in it, written when computed and copied
    # by copy_block. Every cache hit must find exactly the prefix its hash names; no block may leak.
    rng = random.Random(6)
    kv = {}

    def copy(src, dst):
        kv[dst] = kv[src]
    bm = BlockManager(num_blocks=48, block_size=4, copy_block=copy)
    stems = [[rng.randrange(50) for _ in range(rng.randrange(4, 17))] for _ in range(5)]
    running, hits = [], 0

    def write(s, start):  # the KV of positions start.. is computed into s's blocks
        for i in range(start // 4, (len(s) - 1) // 4 + 1):
            kv[s.block_table[i]] = tuple(s.token_ids[:min(4 * i + 4, len(s))])
    for step in range(3000):
        if rng.random() < 0.3 and len(running) < 6:
            s = seq_of(rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))])
            if bm.can_allocate(s):
                bm.allocate(s)
                for i in range(s.num_cached_tokens // 4):
                    assert kv[s.block_table[i]] == tuple(s.token_ids[:4 * i + 4])
                hits += s.num_cached_tokens // 4
                write(s, s.num_cached_tokens)
                running.append(s)
        for s in list(running):
            s.append(rng.randrange(50))
            if rng.random() < 0.05 or not bm.can_append(s):  # finished, aborted or preempted
                bm.deallocate(s)
                running.remove(s)
                continue
            bm.may_append(s)
            write(s, len(s) - 1)
        used = [b for s in running for b in s.block_table]
        assert not set(used) & set(bm.free)
        assert len(set(used)) + len(bm.free) == bm.num_blocks
    for s in running:
        bm.deallocate(s)
    assert bm.all_free() and bm.moves > 50 and hits > 200


def test_runner_copies_a_block_in_every_layer_even_after_its_kv_tensors_are_swapped(tiny_dir):
    import torch
    llm = LLM(str(tiny_dir("llama_tied_gqa")), dtype="float32", block_size=4, num_kv_blocks=12)
    runner = llm.engine.runner
    torch.manual_seed(0)
    runner.kv_pool.normal_()
    runner.copy_block(3, 9)
    assert all(torch.equal(t[9], t[3]) and not torch.equal(t[8], t[3]) for kv in runner.kv_caches for t in kv)
    runner.kv_caches = [(k.clone(), v.clone()) for k, v in runner.kv_caches]  # as bench/knob_ab.py's set_layout
    for k, v in runner.kv_caches:
        k.normal_()
        v.normal_()
    runner.copy_block(5, 1)
    assert all(torch.equal(t[1], t[5]) for kv in runner.kv_caches for t in kv)
