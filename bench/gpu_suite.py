"""Every GPU test and benchmark in one call; prints one short table and writes JSON.

    python bench/gpu_suite.py [--out gpu_suite.json] [--quick]

1. GPU-marked tests (kernels compiled; engine parity on CUDA)
2. device copy bandwidth, the reference for every GB/s figure
3. extended LM head at Qwen-7B shapes (V=151,936, d=4,096, E=6; B=1, 8, 64) vs torch.cat + matmul + argmax
4. paged decode attention vs SDPA on contiguous K/V, contexts 512..32k; paged prefill after a prefix hit
   vs gather + SDPA
5. end-to-end decode tok/s, Qwen2-1.5B / 7B shapes with random bf16 weights, vs HF generate and the floor
6. switching cost (paper Table 5) at 7B shape

Status 2026-11-23: written without a GPU (no device lent in either session so far); it has not run yet.
Expect the first run to need fixes. The table printer is checked on the CPU with a made-up result
(tests/test_gpu_suite_table.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # compiled kernels; importing this module (tests) must not change the environment
    os.environ["TRITON_INTERPRET"] = "0"
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cuda_time(fn, iters: int = 20) -> float:
    """Median seconds of ``fn`` over ``iters`` CUDA-event-timed calls, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_time(lambda: dst.copy_(src))


def run_tests() -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests" / "test_gpu.py")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "0"})
    return {"rc": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def bench_lm_head(bw: float) -> list[dict]:
    from etr.kernels.lm_head import extended_argmax
    V, D, E = 151_936, 4096, 6
    wv = torch.randn(V, D, device="cuda", dtype=torch.bfloat16)
    we = torch.randn(E, D, device="cuda", dtype=torch.bfloat16)
    rows = []
    for B in (1, 8, 64):
        h = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
        t_kernel = cuda_time(lambda: extended_argmax(h, wv, we))
        t_torch = cuda_time(lambda: (h @ torch.cat([wv, we]).T).argmax(-1))
        same = torch.equal(extended_argmax(h, wv, we), (h.float() @ torch.cat([wv, we]).float().T).argmax(-1))
        gbs = (V + E) * D * 2 / t_kernel / 1e9
        rows.append(dict(B=B, kernel_ms=t_kernel * 1e3, torch_ms=t_torch * 1e3, GBps=gbs, frac_bw=gbs * 1e9 / bw,
                         argmax_equal=same))
    return rows


def bench_paged_attention(bw: float, contexts=(512, 2048, 8192, 32768)) -> list[dict]:
    from etr.kernels.paged_attention import paged_decode
    B, H, KVH, D, BS = 8, 32, 8, 128, 16
    rows = []
    for ctx in contexts:
        blocks = B * ctx // BS
        k = torch.randn(blocks, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        tables = torch.arange(blocks, device="cuda", dtype=torch.int32).view(B, -1)
        lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
        t = cuda_time(lambda: paged_decode(q, k, v, tables, lens, D ** -0.5, ctx))
        kc, vc = k.view(B, ctx, KVH, D).transpose(1, 2), v.view(B, ctx, KVH, D).transpose(1, 2)
        t_sdpa = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], kc, vc, enable_gqa=True))
        gbs = 2 * k.numel() * 2 / t / 1e9
        rows.append(dict(context=ctx, paged_ms=t * 1e3, sdpa_ms=t_sdpa * 1e3, GBps=gbs, frac_bw=gbs * 1e9 / bw))
    return rows


def bench_paged_prefill(prefix: int = 1536, new: int = 512, batch: int = 4) -> dict:
    """Prefill after a prefix-cache hit: the Triton kernel over pages vs gather + SDPA (the torch backend)."""
    from etr.kernels.paged_prefill import paged_prefill, paged_prefill_reference
    H, KVH, D, BS = 28, 4, 128, 16
    ctx = prefix + new
    blocks = batch * ctx // BS
    k = torch.randn(blocks, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = torch.arange(blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    q = torch.randn(batch * new, H, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(0, batch * new + 1, new, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    t = cuda_time(lambda: paged_prefill(q, k, v, tables, cu, lens, new, D ** -0.5, block_m=64, block_n=64))
    t_ref = cuda_time(lambda: paged_prefill_reference(q, k, v, tables, [new] * batch, [ctx] * batch, D ** -0.5))
    got = paged_prefill(q, k, v, tables, cu, lens, new, D ** -0.5, block_m=64, block_n=64)
    err = (got.float() - paged_prefill_reference(q, k, v, tables, [new] * batch, [ctx] * batch, D ** -0.5).float())
    return dict(prefix=prefix, new=new, batch=batch, triton_ms=t * 1e3, gather_sdpa_ms=t_ref * 1e3,
                max_abs_err=err.abs().max().item())


SHAPES = {"qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
          "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)}


def random_checkpoint(shape: str, root: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config
    path = root / shape
    if not path.exists():
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[shape]), dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
    return path


def bench_decode(root: Path, bw: float, new_tokens: int = 128) -> list[dict]:
    from transformers import AutoModelForCausalLM
    from etr import LLM, SamplingParams
    rows = []
    for shape in SHAPES:
        path = random_checkpoint(shape, root)
        weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        for backend, batch in [("torch", 1), ("torch", 32), ("triton", 1), ("triton", 32)]:
            # triton: Triton attention with CUDA graphs; torch: SDPA over gathered pages, eager
            llm = LLM(str(path), dtype="bfloat16", device="cuda", max_model_len=512, max_num_seqs=32,
                      attention_backend=backend)
            prompts = [[100 + i + j for j in range(32)] for i in range(batch)]
            params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
            ours = time.perf_counter() - start
            ids = torch.tensor(prompts, device="cuda")
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, pad_token_id=0)
            hf.generate(ids, **kw)
            torch.cuda.synchronize()
            start = time.perf_counter()
            hf.generate(ids, **kw)
            torch.cuda.synchronize()
            theirs = time.perf_counter() - start
            rows.append(dict(shape=shape, backend=backend, batch=batch, etr_ms_per_step=ours / new_tokens * 1e3,
                             hf_ms_per_step=theirs / new_tokens * 1e3, speedup=theirs / ours,
                             floor_ms=weight_bytes / bw * 1e3))
            del llm
            torch.cuda.empty_cache()
        del hf
        torch.cuda.empty_cache()
    return rows


def bench_switch(root: Path) -> dict:
    from dataclasses import asdict
    from etr.switch_cost import measure
    path = str(random_checkpoint("qwen2-7b", root))
    return asdict(measure(path, n_queries=4, new_tokens=256, dtype="bfloat16", device="cuda", repeats=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", ".") + "/gpu_suite.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "lm_head", "attention", "prefill", "decode", "switch"])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    result["copy_GBps"] = bw = copy_bandwidth() / 1e9
    steps = {"tests": run_tests, "lm_head": lambda: bench_lm_head(bw * 1e9),
             "attention": lambda: bench_paged_attention(bw * 1e9), "prefill": bench_paged_prefill}
    with tempfile.TemporaryDirectory() as tmp:
        steps["decode"] = lambda: bench_decode(Path(tmp), bw * 1e9)
        steps["switch"] = lambda: bench_switch(Path(tmp))
        for name, fn in steps.items():
            if name in args.skip:
                continue
            try:
                result[name] = fn()
            except Exception as e:  # one broken step must not hide the others' figures
                result[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"== {name}: {json.dumps(result[name], default=str)[:2000]}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(table(result))
    print(f"JSON in {args.out}")
    return 0


def table(r: dict) -> str:
    """The short summary: one line per measured figure, with the issue's bar beside it."""
    lines = [f"{r['device']}, {r['date']}, copy bandwidth {r['copy_GBps']:.0f} GB/s", "",
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
                    f"{x['etr_ms_per_step']:.2f} ms x{x['speedup']:.2f}",
                    f"{bar} floor {x['floor_ms']:.2f} ms; >= 1.5x (b=1) / 3x (b=32)")
        elif name == "switch":
            add("switch overhead, 7B shape, 256 tokens", f"{v.get('overhead_pct', float('nan')):+.2f}%", "< 1%")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
