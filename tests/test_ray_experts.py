"""Experts in Ray actors: the same tokens as in-process experts and HF (switch at token 0 and later, greedy
and seeded), mixed batches of local and remote experts, placement on a second node, an actor killed
mid-stream, a placement that cannot happen, and aborts that free the actor's blocks.

One local cluster for the whole run (fixed CPUs, no dashboard, no usage statistics, its own temp dir): a head
node and a second node offering the custom resource ``node2``."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

import pytest
import torch

import ray  # noqa: E402 (conftest has set Ray's environment)

from conftest import hf_greedy  # noqa: E402
from etr import AsyncLLM, LLM, SamplingParams  # noqa: E402
from etr.errors import ExpertUnavailableError  # noqa: E402
from test_routing import LLAMA, PROMPTS, dirs, meta_trace, switch_row, write_head  # noqa: E402,F401

N = 24
# An actor's first start imports torch and the engine in a new process: seconds when idle, more than a minute on
# a busy 2-core machine (a fresh CI virtualenv beside other work took over 60 s).
RAY_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def cluster():
    from ray.cluster_utils import Cluster
    temp = tempfile.mkdtemp(prefix="ray_", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    os.environ["RAY_TMPDIR"] = temp  # every file of the cluster in its own folder
    local = {"node_ip_address": "127.0.0.1"}  # nothing of the test cluster listens beyond the loopback
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False,
                                                      "temp_dir": os.path.join(temp, "ray"),
                                                      **local})
    second = c.add_node(num_cpus=1, resources={"node2": 1}, **local)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, second.node_id
    ray.shutdown()
    c.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def heads(dirs, tmp_path, k_astro=1, k_law=4):
    """A head switching PROMPTS[0] to astro at token k_astro and PROMPTS[1] to law at token k_law."""
    traces = [meta_trace(dirs["meta"], p, N) for p in PROMPTS[:2]]
    rows = [switch_row(h, m, k) for (_, h, m), k in zip(traces, (k_astro, k_law))]
    return str(write_head(tmp_path / f"head_{k_astro}_{k_law}.safetensors", ["astro", "law"], rows))


def build(dirs, head, placement, **kw):
    kw.setdefault("ray_timeout_s", RAY_TIMEOUT_S)
    return LLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64, experts={"astro": str(dirs["astro"]),
               "law": str(dirs["law"])}, expert_head=head, expert_placement=placement, **kw)


def key(outs):
    return [(o.expert, o.switch_index, o.token_ids, o.finish_reason) for o in outs]


@pytest.mark.parametrize("k", [0, 3])
def test_remote_equals_local_and_hf(cluster, dirs, tmp_path, hf_model_of, k):
    head = heads(dirs, tmp_path, k_astro=k)
    greedy = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    local = build(dirs, head, {}).generate(PROMPTS, greedy, use_tqdm=False)
    remote_llm = build(dirs, head, {"astro": "ray", "law": "ray"})
    remote = remote_llm.generate(PROMPTS, greedy, use_tqdm=False)
    assert key(remote) == key(local) and remote[0].expert == "astro" and remote[0].switch_index == k
    # The expert continues the shared context exactly as HF generate of the expert would.
    o = remote[0]
    hf = hf_greedy(hf_model_of(dirs["astro"]), PROMPTS[0] + o.token_ids[:k], N - k)
    assert o.token_ids[k:] == hf
    assert o.metrics.switch_prefill_s > 0 and o.metrics.switch_network_s > 0
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=N, ignore_eos=True) for s in (1, 2, 3)]
    assert key(remote_llm.generate(PROMPTS, seeded, use_tqdm=False)) == \
           key(build(dirs, head, {}).generate(PROMPTS, seeded, use_tqdm=False))
    assert remote_llm.switcher.all_free()


def test_mixed_local_and_remote(cluster, dirs, tmp_path):
    head = heads(dirs, tmp_path)
    greedy = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    prompts = PROMPTS + [[5, 6, 7], [90, 91, 92, 93]]
    routes = [None, None, None, "law", "astro"]
    want = build(dirs, head, {}).generate(prompts, greedy, use_tqdm=False, route=routes)
    mixed = build(dirs, head, {"law": "ray"})
    assert mixed.switcher.experts["law"].remote and not mixed.switcher.experts["astro"].remote
    assert key(mixed.generate(prompts, greedy, use_tqdm=False, route=routes)) == key(want)
    assert mixed.switcher.all_free()


def test_placed_on_the_second_node(cluster, dirs, tmp_path):
    _, second = cluster
    head = heads(dirs, tmp_path)
    greedy = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    llm = build(dirs, head, {"law": "ray"}, expert_resources={"law": {"CPU": 1, "node2": 1}})
    assert llm.switcher.experts["law"].info["node_id"] == second
    assert key(llm.generate(PROMPTS, greedy, use_tqdm=False)) == \
           key(build(dirs, head, {}).generate(PROMPTS, greedy, use_tqdm=False))


def test_impossible_placement_fails_in_time(cluster, dirs, tmp_path):
    start = time.monotonic()
    with pytest.raises(ExpertUnavailableError, match=r"expert 'law'.*no node offers \{'CPU': 1, 'gpu9': 1\}"):
        build(dirs, heads(dirs, tmp_path), {"law": "ray"}, expert_resources={"law": {"CPU": 1, "gpu9": 1}},
              ray_timeout_s=3)
    assert time.monotonic() - start < 30


def test_load_failure_is_named(cluster, dirs, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(dirs["law"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ExpertUnavailableError, match=r"expert 'law'.*failed to load: .*CorruptCheckpointError"):
        LLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64, experts={"law": str(broken)},
            expert_placement={"law": "ray"}, ray_timeout_s=RAY_TIMEOUT_S)


def test_killed_actor_and_abort(cluster, dirs, tmp_path):
    """Abort of a request on the remote expert frees the actor's blocks; killing the actor mid-stream fails
    its requests with a named error, the others complete, no block is held, later routes fail at once."""
    head = heads(dirs, tmp_path, k_astro=0, k_law=0)
    llm = AsyncLLM(str(dirs["meta"]), dtype="float32", num_kv_blocks=64, experts={"astro": str(dirs["astro"]),
                   "law": str(dirs["law"])}, expert_head=head, expert_placement={"law": "ray"},
                   ray_timeout_s=RAY_TIMEOUT_S)
    remote = llm._llm.switcher.experts["law"]
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def abort_one():
        sent = False
        async for delta in llm.generate(PROMPTS[1], long, request_id="a"):
            if not sent and delta.token_ids and remote.refresh()["kv_blocks_used"]:
                sent = await llm.abort("a")
                assert sent
        assert delta.finished and delta.finish_reason == "abort"
    asyncio.run(asyncio.wait_for(abort_one(), 60))
    assert remote.refresh()["kv_blocks_used"] == 0

    async def kill_mid_stream():
        async def consume(prompt, route=None):
            return [d async for d in llm.generate(prompt, long, route=route)]
        tasks = [asyncio.create_task(consume(PROMPTS[1])), asyncio.create_task(consume([9, 8, 7], route="law")),
                 asyncio.create_task(consume(PROMPTS[0])), asyncio.create_task(consume([3, 4], route="astro"))]
        while remote.refresh()["num_running"] < 2:
            await asyncio.sleep(0.05)
        ray.kill(remote.actor)
        return await asyncio.gather(*tasks, return_exceptions=True)
    results = asyncio.run(asyncio.wait_for(kill_mid_stream(), 120))
    for r in results[:2]:
        assert isinstance(r, ExpertUnavailableError) and "expert 'law'" in str(r) and "died" in str(r)
    assert results[2][-1].output.expert == "astro" and len(results[2][-1].output.token_ids) == 400
    assert results[3][-1].output.expert == "astro" and results[3][-1].finish_reason == "length"
    async def after_death():
        with pytest.raises(ExpertUnavailableError, match="expert 'law'"):
            llm.submit([1, 2], long, route="law")  # pinned: refused at once
        start = time.monotonic()
        with pytest.raises(ExpertUnavailableError, match="expert 'law'"):  # switched there by the meta at token 0
            [d async for d in llm.generate(PROMPTS[1], long)]
        assert time.monotonic() - start < 5
        return [d async for d in llm.generate(PROMPTS[0], long)]  # the other expert still serves
    assert asyncio.run(asyncio.wait_for(after_death(), 60))[-1].output.expert == "astro"
    for engine in llm._llm.switcher.engines:
        assert engine.all_free()
    llm.shutdown()


def test_switch_cost_with_a_remote_expert(cluster, dirs):
    """The Table 5 protocol with the expert in an actor: every query routes at token 0 (checked inside), and
    the remote hand-off and streaming costs are measured against the same expert in-process."""
    from conftest import load_bench
    measure, report = (getattr(load_bench("switch_cost"), n) for n in ("measure", "report"))
    cost = measure(str(dirs["meta"]), str(dirs["law"]), n_queries=2, new_tokens=4, dtype="float32", repeats=1,
                   placement="ray")
    assert cost.placement == "ray" and cost.switch_local_s_per_query > 0 and cost.network_s_per_switch > 0
    assert cost.remote_streaming_pct is not None and "Ray actor" in report(cost)
