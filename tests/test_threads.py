"""``LLM`` called from several threads at once: every caller gets exactly its own outputs, equal to a
single-threaded call, while the calls share one continuous batch."""

import threading

from etr import LLM, SamplingParams
from test_routing import PROMPTS as ROUTED_PROMPTS, build, dirs, meta_trace, switch_row, write_head  # noqa: F401

PROMPTS = [[(7 * i + j) % 250 + 1 for j in range(1 + i % 9)] for i in range(37)]


def run_threads(n, target):
    results, errors = [None] * n, []

    def work(i):
        try:
            results[i] = target(i)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    return results


def counting_steps(llm):
    """Wrap the switcher's step so that calls are counted; returns ``[steps, most sequences in one step]``."""
    count, step = [0, 0], llm.switcher.step

    def counted():
        count[0] += 1
        progressed = step()
        count[1] = max(count[1], len(progressed))
        return progressed
    llm.switcher.step = counted
    return count


def test_threads_get_their_own_outputs(tiny_dir):
    llm = LLM(str(tiny_dir("llama_tied_gqa")), dtype="float32", max_num_seqs=256, num_kv_blocks=512)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=12)

    def call(i):
        return ([o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
                + [o.token_ids for o in llm.generate(PROMPTS[:5], seeded, use_tqdm=False)])
    steps = counting_steps(llm)
    want = call(0)
    (alone, widest), steps[:] = steps, [0, 0]
    got = run_threads(4, call)
    assert all(g == want for g in got)
    # One shared batch: steps carried several callers' requests at once (one call alone never has more than its
    # 37), so the four calls took fewer steps than one after another would (how many fewer depends on how the
    # threads' starts overlap).
    assert widest == len(PROMPTS) and steps[1] > len(PROMPTS) and steps[0] < 4 * alone
    streamed = run_threads(3, lambda i: sum((d.token_ids for d in llm.stream(PROMPTS[i], params)), []))
    assert streamed == want[:3]
    assert llm.switcher.all_free()


def test_threads_with_routed_and_unrouted_requests(dirs, tmp_path):
    traces = [meta_trace(dirs["meta"], p, 24) for p in ROUTED_PROMPTS[:2]]
    head = write_head(tmp_path / "head.safetensors", ["astro", "law"],
                      [switch_row(h, m, k) for (_, h, m), k in zip(traces, (1, 4))])
    llm = build(dirs, str(head))
    long, short = (SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (24, 1))
    # Switched by the meta, finished on the meta before its switch, and pinned to an expert.
    prompts = ROUTED_PROMPTS + [ROUTED_PROMPTS[0], [5, 6, 7]]
    params, routes = [long, long, long, short, long], [None, None, None, None, "astro"]

    def call(i):
        rot = lambda xs: xs[i:] + xs[:i]  # noqa: E731
        outs = llm.generate(rot(prompts), rot(params), use_tqdm=False, route=rot(routes))
        return [(o.expert, o.switch_index, o.token_ids) for o in outs]
    want = call(0)
    assert [w[:2] for w in want] == [("astro", 1), ("law", 4), ("law", 0), (None, None), ("astro", 0)]
    assert run_threads(4, call) == [want[i:] + want[:i] for i in range(4)]
    assert llm.switcher.all_free()
