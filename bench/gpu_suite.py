"""Every GPU test and benchmark in one call; prints one short table and writes JSON.

    python bench/gpu_suite.py [--out gpu_suite.json] [--skip STEP ...] [--smoke]

1. GPU-marked tests (kernels compiled; engine parity on CUDA)
2. device copy bandwidth, the reference for every GB/s figure
3. extended LM head at Qwen-7B shapes (V=151,936, d=4,096, E=6; B=1, 8, 64) vs torch.cat + matmul + argmax
4. paged decode attention vs SDPA on contiguous K/V, contexts 512..32k; paged prefill after a prefix hit
   vs gather + SDPA
5. end-to-end decode tok/s, Qwen2-1.5B / 7B shapes with random bf16 weights, vs HF generate and the floor
6. switching cost (paper Table 5) at 7B shape

Each step runs in a process of its own, killed at the suite's deadline (bench/suite_process.py): a CUDA fault
or a hang costs that step only, and the table prints before the device's 10-minute limit. Nothing needs to
be installed: where ``etr`` does not import, the suite imports it from the checkout.

``--smoke`` runs every step on the CPU at toy sizes with the kernels interpreted: it proves the suite's own
code on machines without a GPU (tests/test_gpu_suite.py runs it in CI); its figures mean nothing.

Status 2026-11-23: no device has been lent to this project yet, so the suite has run only as ``--smoke``, also
under the GPU machines' torch/Triton/transformers versions (``bench/gpu_mirror.sh``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # importing this module (tests) must not change the environment
    os.environ["TRITON_INTERPRET"] = "1" if "--smoke" in sys.argv else "0"
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suite's sibling modules, however it is loaded
from suite_process import ROOT, importable_from_source, run_step  # noqa: E402
from suite_table import table  # noqa: E402


@dataclass(slots=True)
class Plan:
    """Where the suite runs and at what sizes."""
    device: str
    iters: int
    copy_bytes: int
    head: tuple[int, int, int]  # V, d, E
    head_batches: tuple[int, ...]
    attention: tuple[int, int, int, int, int]  # batch, heads, KV heads, head dim, block size
    contexts: tuple[int, ...]
    prefill: dict
    shapes: dict[str, dict]
    decode_batches: tuple[int, ...]
    new_tokens: int
    switch: dict = field(default_factory=dict)


FULL = Plan(
    "cuda", 20, 1 << 30, (151_936, 4096, 6), (1, 8, 64), (8, 32, 8, 128, 16), (512, 2048, 8192, 32768),
    dict(prefix=1536, new=512, batch=4, heads=28, kv_heads=4, head_dim=128, block=64),
    {"qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
     "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)},
    (1, 32), 128, dict(shape="qwen2-7b", queries=4, new_tokens=256))
SMOKE = Plan(
    "cpu", 2, 1 << 22, (1000, 64, 6), (1, 3), (2, 4, 2, 32, 16), (40, 100),
    dict(prefix=20, new=9, batch=2, heads=4, kv_heads=2, head_dim=32, block=16),
    {"toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)},
    (1, 3), 4, dict(shape="toy", queries=2, new_tokens=4))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, plan: Plan) -> float:
    """Median seconds of ``fn`` over ``plan.iters`` calls after a warm-up (CUDA events on the GPU)."""
    fn()
    sync(plan.device)
    times = []
    for _ in range(plan.iters):
        if plan.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(plan: Plan) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    src = torch.empty(plan.copy_bytes, dtype=torch.uint8, device=plan.device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), plan)


def run_tests(plan: Plan) -> dict:
    """The GPU-marked tests in a subprocess, kernels compiled (all skip without CUDA). Not run from the
    checkout's root, whose ``etr`` folder (the facade alone) would shadow a source tree on PYTHONPATH."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--rootdir", str(ROOT),
                           str(ROOT / "tests" / "test_gpu.py")],
                          capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env={**os.environ, "TRITON_INTERPRET": "0" if plan.device == "cuda" else "1"})
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"rc": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1], "failed": failed}


def bench_lm_head(plan: Plan, bw: float) -> list[dict]:
    from etr.kernels.lm_head import extended_argmax
    V, D, E = plan.head
    wv = torch.randn(V, D, device=plan.device, dtype=torch.bfloat16)
    we = torch.randn(E, D, device=plan.device, dtype=torch.bfloat16)
    rows = []
    for B in plan.head_batches:
        h = torch.randn(B, D, device=plan.device, dtype=torch.bfloat16)
        t_kernel = timed(lambda: extended_argmax(h, wv, we), plan)
        t_torch = timed(lambda: (h @ torch.cat([wv, we]).T).argmax(-1), plan)
        same = torch.equal(extended_argmax(h, wv, we), (h.float() @ torch.cat([wv, we]).float().T).argmax(-1))
        gbs = (V + E) * D * 2 / t_kernel / 1e9
        rows.append(dict(B=B, kernel_ms=t_kernel * 1e3, torch_ms=t_torch * 1e3, GBps=gbs, frac_bw=gbs * 1e9 / bw,
                         argmax_equal=same))
    return rows


def bench_paged_attention(plan: Plan, bw: float) -> list[dict]:
    from etr.kernels.paged_attention import paged_decode
    B, H, KVH, D, BS = plan.attention
    rows = []
    for ctx in plan.contexts:
        blocks = B * -(-ctx // BS)
        k = torch.randn(blocks, BS, KVH, D, device=plan.device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        tables = torch.arange(blocks, device=plan.device, dtype=torch.int32).view(B, -1)
        lens = torch.full((B,), ctx, device=plan.device, dtype=torch.int32)
        q = torch.randn(B, H, D, device=plan.device, dtype=torch.bfloat16)
        t = timed(lambda: paged_decode(q, k, v, tables, lens, D ** -0.5, ctx), plan)
        kc, vc = (x.view(B, -1, KVH, D)[:, :ctx].transpose(1, 2) for x in (k, v))
        t_sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kc, vc,
                                                                                 enable_gqa=True), plan)
        gbs = 2 * B * ctx * KVH * D * 2 / t / 1e9
        rows.append(dict(context=ctx, paged_ms=t * 1e3, sdpa_ms=t_sdpa * 1e3, GBps=gbs, frac_bw=gbs * 1e9 / bw))
    return rows


def bench_paged_prefill(plan: Plan) -> dict:
    """Prefill after a prefix-cache hit: the Triton kernel over pages vs gather + SDPA (the torch backend)."""
    from etr.kernels.paged_prefill import paged_prefill, paged_prefill_reference
    p = plan.prefill
    batch, new, ctx, BS, D = p["batch"], p["new"], p["prefix"] + p["new"], 16, p["head_dim"]
    blocks = batch * -(-ctx // BS)
    k = torch.randn(blocks, BS, p["kv_heads"], D, device=plan.device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = torch.arange(blocks, device=plan.device, dtype=torch.int32).view(batch, -1)
    q = torch.randn(batch * new, p["heads"], D, device=plan.device, dtype=torch.bfloat16)
    cu = torch.arange(0, batch * new + 1, new, device=plan.device, dtype=torch.int32)
    lens = torch.full((batch,), ctx, device=plan.device, dtype=torch.int32)

    def triton():
        return paged_prefill(q, k, v, tables, cu, lens, new, D ** -0.5, block_m=p["block"], block_n=p["block"])

    def reference():
        return paged_prefill_reference(q, k, v, tables, [new] * batch, [ctx] * batch, D ** -0.5)
    t, t_ref = timed(triton, plan), timed(reference, plan)
    err = (triton().float() - reference().float()).abs().max().item()
    return dict(prefix=p["prefix"], new=new, batch=batch, triton_ms=t * 1e3, gather_sdpa_ms=t_ref * 1e3,
                max_abs_err=err)


def random_checkpoint(plan: Plan, shape: str, root: Path) -> Path:
    """A Qwen2 checkpoint of ``shape`` with random bf16 weights (built once per run)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    path = root / shape
    if not path.exists():
        torch.manual_seed(0)
        with torch.device(plan.device):
            model = AutoModelForCausalLM.from_config(Qwen2Config(**plan.shapes[shape]), dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
    return path


def seconds_of(fn, plan: Plan) -> float:
    """Wall time of the second of two calls (the first warms up)."""
    fn()
    sync(plan.device)
    start = time.perf_counter()
    fn()
    sync(plan.device)
    return time.perf_counter() - start


def bench_decode(plan: Plan, root: Path, bw: float) -> list[dict]:
    """ms per decode step (a whole generate of 32-token prompts / new tokens, so the prefill is included) and
    tok/s of the engine (torch backend eager; triton backend with CUDA graphs, without and with the fused
    elementwise kernels) vs HF generate on the same weights and prompts, and the floor: weight bytes / copy
    bandwidth."""
    from transformers import AutoModelForCausalLM
    from etr import LLM, SamplingParams
    rows, n = [], plan.new_tokens
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for shape in plan.shapes:
        path = random_checkpoint(plan, shape, root)
        weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(plan.device).eval()
        hf_ms = {}
        for batch in plan.decode_batches:
            ids = torch.tensor(prompts_of(batch), device=plan.device)
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=0)
            hf_ms[batch] = seconds_of(lambda: hf.generate(ids, **kw), plan) / n * 1e3
        del hf
        release(plan)  # the engine loads the same weights next: never both on the GPU
        for backend in ("torch", "triton", "triton+fused"):
            llm = LLM(str(path), dtype="bfloat16", device=plan.device, max_model_len=512,
                      max_num_seqs=max(plan.decode_batches), attention_backend=backend.split("+")[0],
                      fused_ops=backend.endswith("+fused"))
            for batch in plan.decode_batches:
                ours = seconds_of(lambda: llm.generate(prompts_of(batch), params, use_tqdm=False), plan) / n * 1e3
                rows.append(dict(shape=shape, backend=backend, batch=batch, etr_ms_per_step=ours,
                                 tok_s=batch * 1e3 / ours, hf_ms_per_step=hf_ms[batch], speedup=hf_ms[batch] / ours,
                                 floor_ms=weight_bytes / bw * 1e3))
            del llm
            release(plan)
    return rows


def prompts_of(batch: int) -> list[list[int]]:
    return [[100 + i + j for j in range(32)] for i in range(batch)]


def release(plan: Plan) -> None:
    """Give freed models' memory back before the next one loads."""
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()


def bench_switch(plan: Plan, root: Path) -> dict:
    from dataclasses import asdict
    from switch_cost import measure
    sw = plan.switch
    path = str(random_checkpoint(plan, sw["shape"], root))
    cost = measure(path, n_queries=sw["queries"], new_tokens=sw["new_tokens"], dtype="bfloat16",
                   device=plan.device, repeats=1)
    return {"shape": sw["shape"], **asdict(cost)}


def versions() -> str:
    """torch, Triton, transformers and flash-attn versions of this machine, for the record."""
    import importlib.metadata as md
    found = []
    for pkg in ("torch", "triton", "transformers", "flash-attn"):
        try:
            found.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            found.append(f"{pkg} -")
    return ", ".join(found)


STEPS = ("tests", "lm_head", "attention", "prefill", "decode", "switch")


def step_function(step: str, plan: Plan, workdir: Path, bw: float):
    """The callable that runs ``step`` (``bw``: copy bandwidth in bytes/s; ``workdir``: shared checkpoints)."""
    return {"tests": lambda: run_tests(plan), "lm_head": lambda: bench_lm_head(plan, bw),
            "attention": lambda: bench_paged_attention(plan, bw), "prefill": lambda: bench_paged_prefill(plan),
            "decode": lambda: bench_decode(plan, workdir, bw), "switch": lambda: bench_switch(plan, workdir)}[step]


def run_guarded(step: str, plan: Plan, workdir: Path, bw: float) -> dict:
    """``step`` in this process; an exception becomes the step's error (one broken step must not hide the
    others' figures)."""
    try:
        return step_function(step, plan, workdir, bw)()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    finally:
        release(plan)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", ".") + "/gpu_suite.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, kernels interpreted (no GPU needed)")
    ap.add_argument("--budget-s", type=float, default=510,
                    help="start no step after this many seconds (the device allows 10 minutes a call)")
    ap.add_argument("--deadline-s", type=float, default=580,
                    help="kill a step still running this many seconds after the start, so the table still prints")
    ap.add_argument("--in-process", action="store_true",
                    help="run every step in this process (default: one process per step, see bench/suite_process.py)")
    ap.add_argument("--only", choices=STEPS, help=argparse.SUPPRESS)  # a child process of the suite
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--copy-gbps", type=float, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    plan = SMOKE if args.smoke else FULL
    sys.path.insert(0, str(ROOT / "tests"))
    importable_from_source()
    if args.only:  # one step for a parent suite: its result goes to --out
        result = {args.only: run_guarded(args.only, plan, Path(args.workdir), args.copy_gbps * 1e9)}
        Path(args.out).write_text(json.dumps(result, default=str))
        return 0
    name = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU smoke run (figures meaningless)"
    result = {"device": name, "date": time.strftime("%Y-%m-%d"), "versions": versions()}
    result["copy_GBps"] = bw = copy_bandwidth(plan) / 1e9
    release(plan)
    with tempfile.TemporaryDirectory() as tmp:
        for step in STEPS:
            if step in args.skip:
                continue
            start = time.perf_counter()
            if start - began > args.budget_s:
                result[step] = {"error": f"not run: {start - began:.0f} s spent of the {args.budget_s:.0f} s budget"}
                continue
            if args.in_process:
                result[step] = run_guarded(step, plan, Path(tmp), bw * 1e9)
            else:
                child = ["--copy-gbps", str(bw)] + (["--smoke"] if args.smoke else [])
                result[step] = run_step(step, child, Path(tmp), began + args.deadline_s - start)
            result.setdefault("seconds", {})[step] = round(time.perf_counter() - start, 1)
            print(f"== {step} ({time.perf_counter() - start:.0f} s): {json.dumps(result[step], default=str)[:2000]}",
                  flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))  # a run cut off keeps its figures
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(table(result))
    print(f"JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
