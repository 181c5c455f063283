"""The engine's host work per decode step: scheduling, staging the step's inputs, sampling, appending tokens,
stop checks, with the model's forward and LM head replaced by no-ops.

    python bench/host_overhead.py [--batch 1 8 32] [--steps 400] [--graph-path]

On a GPU the decode forward is one graph replay, so this host work (plus a few launches and copies) is what a
step costs besides the device's time; it adds to every step, since a step is scheduled after the previous one's
tokens arrive. ``--graph-path`` stages inputs through the CUDA-graph buffers as on CUDA (run eagerly here);
without it the eager path also builds the attention metadata. Beside each figure: the same engine's whole step
with the real forward of a tiny model (hidden 64, 1 layer), and the host work's share of it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def step_us(llm, batch: int, steps: int) -> float:
    """Best of three: microseconds per decode step of a greedy batch of ``batch`` (prefill included, 1/steps)."""
    from etr import SamplingParams
    prompts = [[10 + i, 11, 12, 13] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e6


def stub_device_work(llm, batch: int) -> None:
    """Replace the forward (and the graph's forward) and the LM head by constant tensors."""
    runner = llm.engine.runner
    hidden = torch.zeros(batch, runner.config.hidden_size)
    logits = torch.zeros(batch, runner.config.vocab_size)
    logits[:, 65] = 1.0  # a byte token: never EOS
    runner.model.forward = lambda input_ids, *args, **kwargs: hidden[:1].expand(input_ids.shape[0], -1)
    if runner.graphs is not None:
        runner.graphs._forward = lambda buf: hidden[:buf.input_ids.shape[0]]
    runner.compute_logits = lambda h: logits[:h.shape[0]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--graph-path", action="store_true", help="stage inputs through the CUDA-graph buffers")
    args = ap.parse_args(argv)
    from conftest import make_tiny_checkpoint
    from etr import LLM
    kw = dict(attention_backend="triton", cuda_graphs=True) if args.graph_path else {}
    print(f"path: {'graph buffers' if args.graph_path else 'eager'}, {args.steps} steps, CPU threads "
          f"{torch.get_num_threads()}\nbatch  host us/step  whole step us  host share")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "tiny", "llama", num_layers=1, hidden_size=64,
                                    num_attention_heads=4, num_key_value_heads=2, tokenizer=True)
        for batch in args.batch:
            def engine():
                return LLM(str(path), dtype="float32", max_model_len=args.steps + 16, max_num_seqs=batch,
                           num_kv_blocks=batch * (-(-(args.steps + 16) // 16)), **kw)
            whole = None if args.graph_path else step_us(engine(), batch, args.steps)  # interpreted kernels: no
            llm = engine()
            stub_device_work(llm, batch)
            host = step_us(llm, batch, args.steps)
            share = "" if whole is None else f"{host / whole:10.0%}"
            print(f"{batch:5d}  {host:12.0f}  {'-' if whole is None else f'{whole:.0f}':>13}  {share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
