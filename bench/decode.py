"""Decode steps of one model, timed, and optionally profiled: where a step goes.

    python bench/decode.py [--model DIR] [--batch 1] [--context 32] [--steps 16] [--dtype bfloat16]
                           [--profile FILE] [--top 15]          (also: etr bench decode ...)

``batch`` requests of ``context`` random prompt tokens are prefilled, decoded a few warm-up steps, then
``steps`` decode steps are timed (ms per step, tokens/s). With ``--profile`` the same steps run under
``torch.profiler`` a second time: a Chrome trace goes to FILE (open it in Perfetto or chrome://tracing; the
engine's phases are spans named ``etr: ...``), and the top ops by self time and the per-phase totals are
printed. Default model: the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import sys
import time

WARM_UP_STEPS = 3


def decode_steps(llm, batch: int, context: int, steps: int, seed: int = 0):
    """Prefill ``batch`` random prompts, warm up, and return a function running ``steps`` decode steps (ms per
    step) and the sequences (abort them through the engine when done)."""
    import random
    from etr import SamplingParams
    engine, vocab = llm.engine, llm.engine.model_config.vocab_size
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=1 + WARM_UP_STEPS + 2 * steps + 1, ignore_eos=True)
    seqs = [engine.add_request([rng.randrange(vocab) for _ in range(context)], params) for _ in range(batch)]
    while any(s.num_output_tokens == 0 for s in seqs):  # the prefill (several steps past the token budget)
        engine.step()
    for _ in range(WARM_UP_STEPS):
        engine.step()

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            assert len(engine.step()) == batch, "every request decodes in every timed step"
        return (time.perf_counter() - start) / steps
    return run, seqs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", type=int, default=1, help="requests decoded together")
    ap.add_argument("--context", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed (and profiled)")
    ap.add_argument("--dtype", default="bfloat16", help="float32, bfloat16, float16 or auto")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--profile", default=None, help="write a Chrome trace of the steps here")
    ap.add_argument("--top", type=int, default=15, help="ops printed by self time (with --profile)")
    args = ap.parse_args(argv)
    for name in ("batch", "context", "steps", "top"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)} must be >= 1")
    import torch
    from etr import LLM
    from etr.engine.phases import format_totals, phase_totals
    model = args.model
    if model is None:
        from etr.default_model import default_model_dir
        model = str(default_model_dir(torch.float32))
    llm = LLM(model, dtype=args.dtype, device=args.device, max_num_seqs=args.batch,
              max_model_len=args.context + WARM_UP_STEPS + 2 * args.steps + 8)
    run, _ = decode_steps(llm, args.batch, args.context, args.steps)
    seconds = run()
    print(f"decode: batch {args.batch}, context {args.context}: {seconds * 1e3:.2f} ms/step, "
          f"{args.batch / seconds:.1f} tok/s ({args.steps} steps, {llm.config.dtype}, {llm.config.device})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if llm.config.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            run()
        prof.export_chrome_trace(args.profile)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        print(format_totals(phase_totals(prof)))
        print(f"trace: {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
