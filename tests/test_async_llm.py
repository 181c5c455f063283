"""``AsyncLLM``: concurrent callers share one batch and get exactly their own outputs; cancellation, abort,
duplicate ids, a full queue and a dead engine loop are handled, and no KV block is left behind."""

import asyncio
import threading
import time

import pytest

from conftest import inject_step_fault
from etr import AsyncLLM, LLM, SamplingParams
from etr.errors import DuplicateRequestError, EngineDeadError, InvalidPromptError, QueueFullError
from test_routing import PROMPTS as ROUTED_PROMPTS, build, dirs, meta_trace, switch_row, write_head  # noqa: F401

PROMPTS = [[(11 * i + j) % 250 + 1 for j in range(1 + i % 7)] for i in range(32)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_dir):
    return str(tiny_dir("llama_tied_gqa"))


@pytest.fixture
def engine(path):
    llm = AsyncLLM(path, dtype="float32", max_model_len=512, max_num_seqs=8, num_kv_blocks=256, max_waiting=40)
    yield llm
    llm.shutdown()


def blocks_used(llm: AsyncLLM, deadline_s: float = 5.0) -> dict:
    """KV blocks held per model, once the engine thread has caught up (bounded wait)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and (llm.stats.num_running or llm.stats.num_waiting or any(
            llm.stats.kv_blocks_used.values())):
        time.sleep(0.01)
    return llm.stats.kv_blocks_used


async def collect(llm, prompt, params, **kw):
    deltas = [d async for d in llm.generate(prompt, params, **kw)]
    assert [d.finished for d in deltas].count(True) == 1 and deltas[-1].finished
    return deltas


def test_concurrent_requests_match_offline(engine, path):
    want = LLM(path, dtype="float32", max_model_len=512, num_kv_blocks=256).generate(PROMPTS, GREEDY, use_tqdm=False)

    async def main():
        return await asyncio.gather(*(collect(engine, p, GREEDY) for p in PROMPTS))
    got = asyncio.run(main())
    for deltas, w in zip(got, want):
        assert sum((d.token_ids for d in deltas), []) == w.token_ids
        assert deltas[-1].output.token_ids == w.token_ids and deltas[-1].finish_reason == w.finish_reason
    assert engine.stats.generated_tokens == sum(len(w.token_ids) for w in want)
    assert set(blocks_used(engine).values()) == {0}


def test_threads_with_their_own_event_loops(engine, path):
    want = [o.token_ids for o in LLM(path, dtype="float32", max_model_len=512, num_kv_blocks=256).generate(
        PROMPTS[:12], GREEDY, use_tqdm=False)]
    results = {}

    def thread(i):
        async def main():
            return await asyncio.gather(*(collect(engine, p, GREEDY) for p in PROMPTS[4 * i:4 * i + 4]))
        results[i] = [d[-1].output.token_ids for d in asyncio.run(main())]
    threads = [threading.Thread(target=thread, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [t for i in range(3) for t in results[i]] == want


def test_cancel_break_and_abort_free_blocks(engine):
    """Each way of leaving aborts the request before it ran to its end (the switcher is asked to drop it while
    unfinished), and no block is left."""
    aborted, abort = [], engine._llm.switcher.abort

    def recording(seqs):
        aborted.extend(len(s.output_token_ids) for s in seqs if not s.is_finished)
        return abort(seqs)
    engine._llm.switcher.abort = recording

    async def main():
        started = asyncio.Event()

        async def consume(rid):
            async for _ in engine.generate([1, 2, 3], LONG, request_id=rid):
                started.set()
        task = asyncio.create_task(consume("cancelled"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async for delta in engine.generate([4, 5, 6], LONG, request_id="broken"):
            if delta.token_ids:
                break
        deltas = []
        async for delta in engine.generate([7, 8], LONG, request_id="aborted"):
            deltas.append(delta)
            if len(deltas) == 2:
                assert await engine.abort("aborted")
        assert deltas[-1].finished and deltas[-1].finish_reason == "abort" and len(deltas[-1].output.token_ids) < 400
        assert not await engine.abort("aborted")  # finished: nothing to abort
    asyncio.run(main())
    assert set(blocks_used(engine).values()) == {0}
    assert len(aborted) == 3 and all(n < 400 for n in aborted), aborted


def test_duplicate_id_queue_full_and_bad_request(engine):
    async def main():
        first = engine.submit([1, 2], LONG, request_id="x")
        with pytest.raises(DuplicateRequestError, match="'x'"):
            engine.submit([3, 4], LONG, request_id="x")
        with pytest.raises(InvalidPromptError, match="empty prompt"):
            engine.submit([], LONG)  # fails only itself
        streams = [engine.submit([5 + i], LONG) for i in range(47)]  # 8 running + 40 waiting, with "x"
        with pytest.raises(QueueFullError, match="limit max_num_seqs \\+ max_waiting = 48"):
            engine.submit([9], LONG)
        for s in [first, *streams]:
            s.close()
        await asyncio.sleep(0)
        out = await collect(engine, [1, 2], GREEDY, request_id="x")  # the id is free again
        assert out[-1].finished
    asyncio.run(main())
    assert set(blocks_used(engine).values()) == {0}


def test_engine_loop_fault_fails_every_caller(path):
    llm = AsyncLLM(path, dtype="float32", max_model_len=512, max_num_seqs=8, num_kv_blocks=256)
    inject_step_fault(llm._llm.switcher, 5)

    async def main():
        results = await asyncio.gather(*(collect(llm, p, LONG) for p in PROMPTS[:6]), return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) and "injected fault" in str(r) for r in results)
        with pytest.raises(EngineDeadError, match="injected fault"):
            llm.check_health()
        with pytest.raises(EngineDeadError):
            llm.submit([1], GREEDY)
    asyncio.run(asyncio.wait_for(main(), 30))
    llm.shutdown()


def test_routed_streams_match_offline(dirs, tmp_path):
    traces = [meta_trace(dirs["meta"], p, 24) for p in ROUTED_PROMPTS[:2]]
    head = write_head(tmp_path / "head.safetensors", ["astro", "law"],
                      [switch_row(h, m, k) for (_, h, m), k in zip(traces, (1, 4))])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    offline = build(dirs, str(head))
    want = offline.generate(ROUTED_PROMPTS, params, use_tqdm=False)
    llm = AsyncLLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64, expert_head=str(head),
                   experts={"astro": str(dirs["astro"]), "law": str(dirs["law"])})

    async def main():
        return await asyncio.gather(*(collect(llm, p, params) for p in ROUTED_PROMPTS))
    got = asyncio.run(main())
    assert [(d[-1].output.expert, d[-1].output.switch_index, sum((x.token_ids for x in d), [])) for d in got] == \
           [(w.expert, w.switch_index, w.token_ids) for w in want]
    assert {w.expert for w in want} >= {"astro", "law"} and llm.stats.switches == dict(offline.switcher.switches)
    assert set(blocks_used(llm).values()) == {0}
    llm.shutdown()
