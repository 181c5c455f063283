"""One speed knob of the CPU engine on against off in whole engine decode steps, interleaved in one process.

    python bench/knob_ab.py --knob {pack_k,gemm_prefetch,one_walk,cpu_argmax,step_region,huge_pages,huge_kv,stream_hint,v_stream} [--model DIR] [--points 16x128 16x2048 1x4096]
                            [--rounds 8] [--steps 4]

Knobs (each changes timings only; the tests check the tokens):
- ``pack_k``: the K pool packed for the decode attention's bf16 path (``cpu_paged_decode.pack_k``; off: the row
  layout V has, as with ``ETR_CPU_PACK_K=0``). Every layer's K pool is converted between rounds.
- ``gemm_prefetch``: the package's bf16 GEMM prefetching the next weight block while its later row tiles run
  (``set_prefetch`` of the linear op and of the decode step's op alike; off: as with
  ``ETR_CPU_GEMM_PREFETCH=0``). It acts where several tiles walk a block: from 13 rows up (from 5 with
  ``ETR_CPU_GEMM_NTA=0`` or ``ETR_CPU_GEMM_ONE_WALK=0``), and at 5-12 rows with the stream hint off.
- ``one_walk``: the package's bf16 GEMM running up to 12 rows as one row tile (``set_one_walk`` of the linear op
  and of the decode step's op alike; off: tiles of 8, 4 and less, 5-8 rows as 4 and the rest, as with
  ``ETR_CPU_GEMM_ONE_WALK=0``). It acts at 5-12 rows, and at more unless they are a multiple of 8 (the linear
  op cuts more than 48 rows into chunks of 48: there, unless the last chunk is).
- ``step_region``: the CPU decode step's one parallel region a layer at 1-64 rows (kernels/cpu_decode_step.cpp,
  ``set_region``; off: one op a linear, as with ``ETR_CPU_STEP_REGION=0``). It acts at batch 1-64.
- ``huge_pages``: the package's packed weights in one mapping on transparent huge pages (kernels/huge_pages.py;
  off: copies of them on torch's 4 KB pages, as with ``ETR_CPU_HUGE_PAGES=0``). Both copies are kept, so the
  process holds the weights twice. It acts at every batch size.
- ``huge_kv``: the KV pool on transparent huge pages (kernels/huge_pages.py, as with ``ETR_CPU_HUGE_KV=1``;
  off: a pool on torch's pages, the default). The whole pool is copied to the other side at each switch
  (outside the timing), so the process holds it twice, both resident. It acts most with long contexts.
- ``stream_hint``: the GEMM's tiles that walk a block once prefetching the weights they stream 4 KB ahead with
  the non-temporal hint, in the linear op and the decode step's op alike (``set_stream_hint`` of each; off, as
  with ``ETR_CPU_GEMM_NTA=0``: plain loads only at 1-4 rows, the next block prefetched into L2 at 5-12). It acts
  at batch 1-12 (1-4 with ``ETR_CPU_GEMM_ONE_WALK=0``).
- ``v_stream``: the decode attention's values pass streaming its own V rows into L2 ahead of its loads
  (``cpu_paged_decode.set_values_stream``; off, as with ``ETR_CPU_ATTN_V_STREAM=0``: the values pass fetches
  its rows into L1 16 positions ahead, and with packed K, the engine's CPU default, the scores pass fetches the
  V pages a page ahead of its own). It acts most with long contexts.
- ``cpu_argmax``: greedy sampling's argmax by the package's op (kernels/cpu_argmax.py; off: torch's
  ``max(dim=-1)``, as with ``ETR_CPU_ARGMAX=0``).

This machine's speed drifts by tens of percent within minutes, so the two sides are not timed one after the
other: for each point (batch x context) the engine prefills, then decodes ``rounds`` pairs of rounds of
``steps`` steps, the knob switched between the rounds of a pair (outside the timing; which side goes first
alternates). The figure is the median of the pairs' on/off ratios with its quartiles, beside each side's ms
per step and the step's bandwidth floor (weights + the KV of the context, at the read bandwidth measured at
the start). Whole engine steps are timed (scheduling and sampling included).
"""

from __future__ import annotations

import argparse
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import decode_steps  # noqa: E402
from glue_ab import quartiles  # noqa: E402
from scaling import read_bandwidth, step_bytes, weight_bytes  # noqa: E402


def set_layout(runner, packed: bool) -> None:
    """Every layer's K pool in the packed or the row layout (a copy where it changes)."""
    from etr.kernels import cpu_paged_decode as K
    runner.kv_caches = [(K.pack_k(k) if packed and k.dim() == 4 else k if packed else K.unpack_k(k), v)
                        for k, v in runner.kv_caches]


def set_gemm_prefetch(on: bool) -> None:
    from etr.kernels import cpu_bf16_linear, cpu_decode_step
    cpu_bf16_linear.set_prefetch(on)
    if cpu_decode_step.available():
        cpu_decode_step.set_prefetch(on)


def set_one_walk(on: bool) -> None:
    from etr.kernels import cpu_bf16_linear, cpu_decode_step
    cpu_bf16_linear.set_one_walk(on)
    if cpu_decode_step.available():
        cpu_decode_step.set_one_walk(on)


def set_step_region(on: bool) -> None:
    import torch
    torch.ops.etr_cpu_step.set_region(on)


# engine -> the huge copy's address -> (huge copy, copy on torch's pages); engine -> {on huge pages: pool}
SMALL_PAGE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
KV_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_huge_pages(engine, on: bool) -> None:
    """Point the step op and every packed linear at the huge-page copies of the weights (on) or at copies on
    torch's pages (off; made on first use, one allocation each: this side also loses the step-order layout, and
    on a host whose THP setting is "always" torch's own large allocations may get huge pages too)."""
    runner = engine.runner
    linears = [m for m in runner.model.modules() if getattr(m, "kind", None) == "etr"]
    if engine not in SMALL_PAGE_COPIES:
        SMALL_PAGE_COPIES[engine] = {m.packed.data_ptr(): (m.packed, m.packed.clone()) for m in linears}
    pairs = SMALL_PAGE_COPIES[engine]
    side = {ptr: pair[0 if on else 1] for ptr, pair in pairs.items()}
    side.update({pair[1].data_ptr(): pair[0 if on else 1] for pair in pairs.values()})
    for m in linears:
        m.packed = side[m.packed.data_ptr()]
    step = runner.native_step
    if step is not None:
        step.weights = [side.get(w.data_ptr(), w) for w in step.weights]


def set_huge_kv(engine, on: bool) -> None:
    """Move the engine's KV (every block, every layer) into a pool on huge pages (on) or on torch's pages (off),
    the side the engine did not start with made on first use, and point the runner's layer views at it."""
    import torch
    from etr.engine.kv_cache import wants_huge_pages
    from etr.kernels import huge_pages
    runner = engine.runner
    if engine not in KV_POOLS:
        start = wants_huge_pages(engine.device)
        other = (torch.empty_like(runner.kv_pool) if start
                 else huge_pages.empty(tuple(runner.kv_pool.shape), runner.kv_pool.dtype))
        KV_POOLS[engine] = {start: runner.kv_pool, not start: other}
    target = KV_POOLS[engine][on]
    if target is runner.kv_pool:
        return
    target.copy_(runner.kv_pool)
    runner.pool_layers = [(target[i, 0].view(k.shape), target[i, 1]) for i, (k, _) in enumerate(runner.pool_layers)]
    runner.kv_caches, runner.kv_pool = runner.pool_layers, target


def set_stream_hint(on: bool) -> None:
    from etr.kernels import cpu_bf16_linear, cpu_decode_step
    cpu_bf16_linear.set_stream_hint(on)
    if cpu_decode_step.available():
        cpu_decode_step.set_stream_hint(on)


def set_values_stream(on: bool) -> None:
    from etr.kernels import cpu_paged_decode
    cpu_paged_decode.set_values_stream(on)


def set_cpu_argmax(engine, on: bool) -> None:
    engine.sampler.cpu_argmax = on


def pack_k_missing(engine) -> str | None:
    if engine.runner.kv_caches[0][0].dim() != 5:
        return ("this engine's K pool is not packed here (cpu_paged_decode.packs_k: the op's bf16 path, pages of a "
                "multiple of 16, ETR_CPU_PACK_K)")
    return None


def v_stream_missing(engine) -> str | None:
    import torch
    from etr.kernels import cpu_paged_decode as K
    k = engine.runner.kv_caches[0][0]
    if engine.device.type != "cpu" or not K.available():
        return "this engine's decode attention is not the package's CPU op here"
    if k.dtype != torch.bfloat16 or not K.bf16_path(engine.runner.kv_caches[0][1].shape[-1]):
        return "this engine's decode attention does not take the op's bf16 path (a bf16 pool, head size 32-128)"
    return None


def gemm_prefetch_missing(engine) -> str | None:
    from etr.kernels import cpu_bf16_linear
    if not cpu_bf16_linear.available():
        return f"the package's bf16 GEMM is not in use here ({cpu_bf16_linear.load_error()})"
    return None


def step_region_missing(engine) -> str | None:
    import torch
    step = engine.runner.native_step
    if step is None or step.glue != "raw" or step.kind != "etr" or any(b is not None for b in step.biases):
        return ("this engine's decode step does not take the region here (it needs the step op's raw glue on the "
                "package's bf16 GEMM, and a model without biases)")
    if torch.get_num_threads() < 2:
        return "the region needs two threads or more; torch runs 1"
    return None


def huge_pages_missing(engine) -> str | None:
    from etr.kernels import huge_pages
    head = engine.runner.model.head_proj
    if getattr(head, "kind", None) != "etr" or not huge_pages.huge_bytes(head.packed):
        return ("this engine's packed weights are not on huge pages here (they need the package's bf16 GEMM and "
                "transparent huge pages; ETR_CPU_HUGE_PAGES=0 turns them off)")
    return None


def huge_kv_missing(engine) -> str | None:
    from etr.kernels import huge_pages
    if engine.device.type != "cpu" or not huge_pages.supported():
        return "this engine's KV pool is not on huge pages here (a CPU engine with transparent huge pages needed)"
    if engine.runner.kv_caches is not engine.runner.pool_layers:
        return "this engine's layers do not read the pool's own views"
    return None


def cpu_argmax_missing(engine) -> str | None:
    from etr.kernels import cpu_argmax
    return None if engine.sampler.cpu_argmax else f"the argmax op is not in use here ({cpu_argmax.load_error()})"


# name: (switch(engine, on), why the knob cannot be compared here or None, the on side's name, the off side's)
KNOBS = {
    "pack_k": (lambda engine, on: set_layout(engine.runner, on), pack_k_missing, "packed", "rows"),
    "gemm_prefetch": (lambda engine, on: set_gemm_prefetch(on), gemm_prefetch_missing, "prefetch",
                      "no prefetch"),
    "one_walk": (lambda engine, on: set_one_walk(on), gemm_prefetch_missing, "one walk", "tiles of 8, 4 and less"),
    "huge_pages": (set_huge_pages, huge_pages_missing, "huge pages", "4 KB pages"),
    "huge_kv": (set_huge_kv, huge_kv_missing, "huge pages", "4 KB pages"),
    "stream_hint": (lambda engine, on: set_stream_hint(on), gemm_prefetch_missing, "non-temporal", "plain"),
    "cpu_argmax": (set_cpu_argmax, cpu_argmax_missing, "op", "torch"),
    "v_stream": (lambda engine, on: set_values_stream(on), v_stream_missing, "values pass streams V",
                 "scores pass fetches V"),
    "step_region": (lambda engine, on: set_step_region(on), step_region_missing, "region", "op a linear"),
}


def interleaved(llm, knob: str, batch: int, context: int, rounds: int, steps: int) -> dict:
    """ms per step of each side and the pairs' on/off ratios (see the module doc); leaves the knob on."""
    engine, switch = llm.engine, KNOBS[knob][0]
    run, seqs = decode_steps(llm, batch, context, rounds * steps)
    ms = {True: [], False: []}
    ratios = []
    for i in range(rounds):
        pair = {}
        for on in (True, False) if i % 2 == 0 else (False, True):
            switch(engine, on)
            start = time.perf_counter()
            for _ in range(steps):
                llm.engine.step()
            pair[on] = (time.perf_counter() - start) / steps * 1e3
            ms[on].append(pair[on])
        ratios.append(pair[True] / pair[False])
    switch(engine, True)
    llm.engine.abort(seqs)
    return {"on_ms": quartiles(ms[True]), "off_ms": quartiles(ms[False]), "ratio": quartiles(ratios)}


def parse_point(text: str) -> tuple[int, int]:
    try:
        batch, context = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"point {text!r}: expected BATCHxCONTEXT, e.g. 16x2048") from None
    if batch < 1 or context < 1:
        raise argparse.ArgumentTypeError(f"point {text!r}: batch and context must be >= 1")
    return batch, context


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--knob", choices=sorted(KNOBS), required=True, help="what is switched on and off")
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--points", type=parse_point, nargs="+", default=[(16, 128), (16, 2048), (16, 4096), (1, 4096)],
                    help="BATCHxCONTEXT points")
    ap.add_argument("--rounds", type=int, default=8, help="pairs of rounds per point")
    ap.add_argument("--steps", type=int, default=4, help="decode steps per round")
    args = ap.parse_args(argv)
    import torch
    from etr import LLM
    model = args.model
    if model is None:
        from etr.default_model import default_model_dir
        model = str(default_model_dir(torch.float32))
    longest = max(c for _, c in args.points) + 2 * args.rounds * args.steps + 16
    llm = LLM(model, dtype="bfloat16", max_num_seqs=max(b for b, _ in args.points), max_model_len=longest)
    _, missing, on_name, off_name = KNOBS[args.knob]
    why = missing(llm.engine)
    if why:
        print(f"{why}; nothing to compare", file=sys.stderr)
        return 1
    bandwidth = read_bandwidth()
    from etr.models.loader import load_model
    weights = weight_bytes(load_model(model, torch.bfloat16, "cpu"))  # the engine's packed linears are not parameters
    print(f"knob {args.knob}; read bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weights / 1e6:.0f} MB; "
          f"{args.rounds} pairs of {args.steps} steps a point")
    print(f"| batch | context | floor ms | {off_name} ms/step (q1 / median / q3) | {on_name} ms/step | {on_name} / "
          f"{off_name} (q1 / median / q3) | {on_name} median x floor |")
    print("| ---: | ---: | ---: | --- | --- | --- | ---: |")
    for batch, context in args.points:
        floor = step_bytes(llm.engine.model_config, weights, batch, context, 2) / bandwidth * 1e3
        r = interleaved(llm, args.knob, batch, context, args.rounds, args.steps)
        fmt = lambda q, d: " / ".join(f"{v:.{d}f}" for v in q)  # noqa: E731
        print(f"| {batch} | {context} | {floor:.1f} | {fmt(r['off_ms'], 1)} | {fmt(r['on_ms'], 1)} | "
              f"{fmt(r['ratio'], 3)} | {r['on_ms'][1] / floor:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
