"""Compile every Triton kernel ahead of time for an H100 (sm_90) on a machine without a GPU.

Triton's NVIDIA backend and the ``ptxas`` it ships need no device to turn a kernel into a cubin, so
type errors, tl.dot shape rules and shared-memory use of the compiled path show up here; the interpreter,
which runs the kernels' Python, catches none of them. Run in a process with ``TRITON_INTERPRET=0`` (the
code generator follows that setting); ``python tests/sm90_compile.py`` prints one JSON line per kernel
configuration: its name, whether it compiled (else the error), its shared memory in bytes, its registers per
thread and stack bytes (spills) as the cuobjdump Triton ships reads them from the cubin, and its scalar
2-byte global loads in the PTX (vectorized loads move 16 bytes; a bf16 stream read 2 bytes at a time is slow).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (227 KiB)
BF, F32 = "bf16", "fp32"
UNALIGNED_STRIDES = {"stride_bt", "stride_lb", "stride_lh", "stride_os", "stride_ps", "stride_out"}  # grid-sized
ALIGNED_SIZES = {"D", "N", "V", "PAGE", "SPLIT_TOKENS", "HALF"}  # head dim, hidden, vocabulary, page, split


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack (spill) bytes of a cubin, from the cuobjdump Triton ships."""
    import re
    import subprocess
    import tempfile
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(regs=int(found[1]), stack=int(found[2])) if found else {}


def compile_sm90(kernel, ptrs: dict[str, str], constexprs: dict, **options) -> dict:
    """Compile ``kernel`` for sm_90; returns its shared memory, registers and stack bytes. Integer arguments
    compile as i32, ``scale`` and ``eps`` as fp32, pointers as given."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    fn = JITFunction(getattr(kernel, "fn", kernel))
    sig = {n: "constexpr" if n in constexprs else "*" + ptrs[n] if n in ptrs else
           "fp32" if n in ("scale", "eps") else "i32" for n in fn.arg_names}
    # As the launcher specializes them at the engine's shapes: tensors are 16-byte aligned, and row strides
    # and model sizes are multiples of 16 (that is what lets the compiler vectorize the loads).
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if n in ptrs or n in ALIGNED_SIZES or (n.startswith("stride") and n not in UNALIGNED_STRIDES)}
    compiled = triton.compile(ASTSource(fn, sig, constexprs, aligned), target=GPUTarget("cuda", 90, 32),
                              options=options)
    return dict(shared=compiled.metadata.shared, scalar_loads=compiled.asm["ptx"].count("ld.global.b16"),
                **resource_usage(compiled.asm["cubin"]))


def cases():
    """(name, kernel, pointer types, constexprs, options) at the shapes the engine and the suite launch."""
    from etr.kernels import fused_norm, kv_write, lm_head, paged_attention, paged_prefill, rotary, silu_mul
    for dt in (BF, F32):
        up = dt == F32
        yield (f"kv_write {dt}", kv_write._write_kv_kernel,
               dict(k_ptr=dt, v_ptr=dt, k_cache_ptr=dt, v_cache_ptr=dt, slot_ptr="i64"), dict(BLOCK=512), {})
        yield (f"paged_decode {dt} group 7, d 128", paged_attention._paged_decode_kernel,
               dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, bt_ptr="i32", ctx_ptr="i32", out_ptr=F32, lse_ptr=F32),
               dict(BLOCK_T=paged_attention.BLOCK_T, BLOCK_G=16, BLOCK_D=128, UPCAST=up),
               dict(num_warps=paged_attention.NUM_WARPS))
        yield (f"combine {dt} 128 splits", paged_attention._combine_kernel,
               dict(part_ptr=F32, lse_ptr=F32, out_ptr=dt), dict(BLOCK_S=128, BLOCK_D=128), {})
        yield (f"paged_prefill {dt} 64x64, d 128", paged_prefill._paged_prefill_kernel,
               dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, out_ptr=dt, bt_ptr="i32", cu_q_ptr="i32", ctx_ptr="i32"),
               dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, UPCAST=up), dict(num_warps=8))
        for res in (False, True):
            yield (f"add_rms_norm {dt} 4096 residual={res}", fused_norm._add_rms_norm_kernel,
                   dict(x_ptr=dt, r_ptr=dt, w_ptr=dt, out_ptr=dt, sum_ptr=dt), dict(HAS_RESIDUAL=res, BLOCK=4096), {})
        yield (f"rotary {dt} 32 heads, d 128", rotary._rotary_kernel,
               dict(x_ptr=dt, pos_ptr="i64", cos_ptr=F32, sin_ptr=F32), dict(BLOCK_H=32, BLOCK_D=64), {})
        yield (f"silu_mul {dt}", silu_mul._silu_mul_kernel, dict(gu_ptr=dt, out_ptr=dt), dict(BLOCK=silu_mul.BLOCK), {})
        for cfg in lm_head._tuned_head_kernel.configs:
            for block_b, write in ((16, False), (64, False), (64, True)):  # greedy decode; logits for sampling
                yield (f"lm_head {dt} B-block {block_b} write={write} | {cfg}", lm_head._extended_head_kernel,
                       dict(h_ptr=dt, wv_ptr=dt, we_ptr=dt, out_ptr=F32, pmax_ptr=F32, pidx_ptr="i32"),
                       dict(BLOCK_B=block_b, BLOCK_N=64, WRITE_LOGITS=write, UPCAST=up, **cfg.kwargs),
                       dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET=0: the code generator follows that setting")
    for name, kernel, ptrs, constexprs, options in cases():
        try:
            row = dict(name=name, ok=True, **compile_sm90(kernel, ptrs, constexprs, **options))
        except Exception as e:  # report every configuration, not just the first failure
            row = dict(name=name, ok=False, error=f"{type(e).__name__}: {str(e)[-800:]}")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
