"""Every GPU test and benchmark in one call; prints one short table and writes JSON.

    python bench/gpu_suite.py [--out gpu_suite.json] [--skip STEP ...] [--smoke]

1. GPU-marked tests (kernels compiled; engine parity on CUDA)
2. device copy bandwidth, the reference for every GB/s figure
3. extended LM head at Qwen-7B shapes (V=151,936, d=4,096, E=6; B=1, 8, 64) vs torch.cat + matmul + argmax
4. paged decode attention vs SDPA on contiguous K/V, contexts 512..32k; paged prefill after a prefix hit
   vs gather + SDPA
5. end-to-end decode tok/s, Qwen2-1.5B / 7B shapes with random bf16 weights, vs HF generate and the floor
6. switching cost (paper Table 5) at 7B shape

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

ROOT = Path(__file__).resolve().parents[1]


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


SUBPACKAGES = ("engine", "kernels", "models", "routing")  # top-level folders installed as etr.<name> (pyproject)


def source_tree(tree: Path) -> Path:
    """Lay out the installed package ``etr`` (etr/ with the subpackages inside) in ``tree`` as symlinks
    into the checkout; returns ``tree``."""
    (tree / "etr").mkdir(parents=True)
    for item in (ROOT / "etr").iterdir():
        (tree / "etr" / item.name).symlink_to(item)
    for name in SUBPACKAGES:
        (tree / "etr" / name).symlink_to(ROOT / name)
    return tree


def importable_from_source() -> Path | None:
    """Make ``import etr`` work where the checkout arrived as source and nothing was installed (the GPU
    machine): the installed layout, built of symlinks in a temporary folder, goes first on ``sys.path`` and
    on ``PYTHONPATH`` (the tests' subprocess). Returns that folder; None where ``etr`` already imports."""
    try:
        import etr.engine  # noqa: F401
        return None
    except ModuleNotFoundError:
        for name in [m for m in sys.modules if m == "etr" or m.startswith("etr.")]:
            del sys.modules[name]
    tree = source_tree(Path(tempfile.mkdtemp(prefix="etr-source-")))
    sys.path.insert(0, str(tree))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    return tree


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
    from etr.switch_cost import measure
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", ".") + "/gpu_suite.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "lm_head", "attention", "prefill", "decode", "switch"])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, kernels interpreted (no GPU needed)")
    ap.add_argument("--budget-s", type=float, default=510,
                    help="start no step after this many seconds (the device allows 10 minutes a call)")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    plan = SMOKE if args.smoke else FULL
    sys.path.insert(0, str(ROOT / "tests"))
    importable_from_source()
    name = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU smoke run (figures meaningless)"
    result = {"device": name, "date": time.strftime("%Y-%m-%d"), "versions": versions()}
    result["copy_GBps"] = bw = copy_bandwidth(plan) / 1e9
    steps = {"tests": lambda: run_tests(plan), "lm_head": lambda: bench_lm_head(plan, bw * 1e9),
             "attention": lambda: bench_paged_attention(plan, bw * 1e9), "prefill": lambda: bench_paged_prefill(plan)}
    with tempfile.TemporaryDirectory() as tmp:
        steps["decode"] = lambda: bench_decode(plan, Path(tmp), bw * 1e9)
        steps["switch"] = lambda: bench_switch(plan, Path(tmp))
        for step, fn in steps.items():
            if step in args.skip:
                continue
            start = time.perf_counter()
            if start - began > args.budget_s:
                result[step] = {"error": f"not run: {start - began:.0f} s spent of the {args.budget_s:.0f} s budget"}
                continue
            try:
                result[step] = fn()
            except Exception as e:  # one broken step must not hide the others' figures
                result[step] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            release(plan)
            result.setdefault("seconds", {})[step] = round(time.perf_counter() - start, 1)
            print(f"== {step} ({time.perf_counter() - start:.0f} s): {json.dumps(result[step], default=str)[:2000]}",
                  flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))  # a run cut off keeps its figures
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(table(result))
    print(f"JSON in {args.out}")
    return 0


def table(r: dict) -> str:
    """The short summary: one line per measured figure, with the issue's bar beside it."""
    spent = sum(r.get("seconds", {}).values())
    lines = [f"{r['device']}, {r['date']}, copy bandwidth {r['copy_GBps']:.0f} GB/s, steps took {spent:.0f} s",
             r.get("versions", ""), "",
             f"{'what':<44}{'measured':>22}  bar"]

    def add(what, measured, bar=""):
        lines.append(f"{what:<44}{measured:>22}  {bar}")
    for name in ("tests", "lm_head", "attention", "prefill", "decode", "switch"):
        v = r.get(name)
        if v is None:
            continue
        if isinstance(v, dict) and "error" in v:
            add(name, "ERROR", v["error"][:60])
        elif name == "tests":
            add("GPU tests", v["summary"][:22], "all pass")
            for line in v.get("failed", [])[:8]:
                add("  " + line.split(" - ")[0][-42:], "", line.partition(" - ")[2][:60])
        elif name == "lm_head":
            for x in v:
                add(f"extended head B={x['B']} (torch {x['torch_ms']:.3f} ms)",
                    f"{x['kernel_ms']:.3f} ms {100 * x['frac_bw']:.0f}%bw", "<= 0.46 ms, argmax equal: "
                    + str(x["argmax_equal"]))
        elif name == "attention":
            for x in v:
                add(f"paged decode ctx={x['context']} (SDPA {x['sdpa_ms']:.3f} ms)",
                    f"{x['paged_ms']:.3f} ms {x['GBps']:.0f} GB/s")
        elif name == "prefill":
            add(f"prefill {v['new']} new after {v['prefix']} cached, b={v['batch']}",
                f"{v['triton_ms']:.3f} ms", f"gather+SDPA {v['gather_sdpa_ms']:.3f} ms, err {v['max_abs_err']:.3f}")
        elif name == "decode":
            for x in v:
                bar = {("qwen2-7b", 1): "<= 6.3 ms", ("qwen2-1.5b", 1): "<= 1.8 ms"}.get((x["shape"], x["batch"]), "")
                add(f"decode {x['shape']} {x.get('backend', '')} b={x['batch']} (HF {x['hf_ms_per_step']:.2f})",
                    f"{x['etr_ms_per_step']:.2f} ms {x.get('tok_s', 0):.0f} t/s x{x['speedup']:.2f}",
                    f"{bar} floor {x['floor_ms']:.2f} ms; >= 1.5x (b=1) / 3x (b=32)")
        elif name == "switch":
            add(f"switch overhead, {v.get('shape', '?')}, {v['new_tokens']} tokens",
                f"{v['overhead_pct']:+.2f}%", f"< 1%; expert prefill {v['expert_prefill_s_per_query'] * 1e3:.1f} ms, "
                f"pairs median {v.get('paired_median_pct', float('nan')):+.2f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
