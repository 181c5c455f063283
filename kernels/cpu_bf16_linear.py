"""bf16 linear layers on CPUs with AVX512-BF16 and no AMX (``cpu_bf16_linear.cpp``): weights packed once into
the bf16 dot instruction's operand layout, any number of input rows.

Measured against oneDNN's prepacked bf16 GEMM on a Zen 4 CPU it is faster at every row count from 1 (a
decode step at batch 1, where it streams the weights at close to the read bandwidth) to 1,024 (a prefill)
(bench/RESULTS.md). ``PackedBf16Linear`` (kernels/cpu_gemm.py) uses it where ``available()``; on CPUs with AMX
oneDNN's AMX GEMM stays (not measured against this one). Built on first use (kernels/cpp_op.py);
``ETR_CPU_LINEAR=0`` turns it off, ``ETR_CPU_GEMM_PREFETCH=0`` only its prefetch (``set_prefetch``; the env
variable turns off the decode step op's copy too),
``ETR_CPU_GEMM_NTA=0`` only its non-temporal hint where a block is walked once, 1-12 rows (``set_stream_hint``),
``ETR_CPU_GEMM_ONE_WALK=0`` only its one tile for 5-12 rows (``set_one_walk``; both ops, as the prefetch's
variable).
``reference`` is the plain-torch computation it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from etr.kernels.cpp_op import CppOp

OP = CppOp("cpu_bf16_linear.cpp", "CPU bf16 linear op", "ETR_CPU_LINEAR")


def built() -> bool:
    """Whether the op is loaded (compiled first if needed), whatever this CPU is: without AVX512-BF16 it runs
    a plain C++ loop, correct and slow (the tests run it there)."""
    return OP.available()


def available() -> bool:
    """Whether the op is loaded and the one to use here: the CPU has AVX512-BF16 and no AMX."""
    from etr.kernels.cpu_gemm import cpu_flags
    flags = cpu_flags()
    if not built():
        return False
    if "avx512_bf16" not in flags or not torch.ops.etr_cpu_linear.native():
        why = "this CPU has no AVX512-BF16"
    elif "amx_bf16" in flags:
        why = "this CPU has AMX: oneDNN's bf16 GEMM is used"
    else:
        OP.error = None
        return True
    OP.error = why
    return False


def load_error() -> str | None:
    """Why the op is not available (None when it is, or before ``available()`` was asked)."""
    return OP.error


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 ``[out, in]`` weight in the op's layout (``[ceil(out/32), ceil(in/2), 32, 2]``, zero-padded)."""
    return torch.ops.etr_cpu_linear.pack(weight.detach())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on ``packed = pack(weight)``, all bf16, any leading dims; float32 products
    and sums, rounded to bf16 once. The same bits on any number of threads, and for a row whatever rows run
    with it."""
    return torch.ops.etr_cpu_linear.linear(x, packed, bias, out_features)


def set_prefetch(on: bool) -> bool:
    """Turn the GEMM's prefetch of the next weight block on or off in this op (on unless
    ``ETR_CPU_GEMM_PREFETCH=0``; the decode step's op has its own copy, ``cpu_decode_step.set_prefetch``) and
    return the previous setting. It changes timings only, never a result: where several row tiles walk a block
    (13 rows and more; from 5 with the stream hint or the one walk off) they fetch the next block into L2 while
    they run, so that the weight stream does not idle while the later tiles read the block from the caches
    (bench/RESULTS.md)."""
    return bool(torch.ops.etr_cpu_linear.set_prefetch(bool(on)))


def set_stream_hint(on: bool) -> bool:
    """Turn the non-temporal hint of the GEMM's tiles that walk a block once (1-4 rows, and 5-12 with the one
    walk) on or off (this op only: the decode step's op has its own, ``cpu_decode_step.set_stream_hint``; on
    unless ``ETR_CPU_GEMM_NTA=0``) and return the previous setting. It changes timings only, never a result: the
    tiles prefetch the weights they stream 4 KB ahead with the non-temporal hint, so that a step's ~270 MB of
    weights do not evict from L2 and L3 what the glue and the Python between steps use next; off, tiles of 5-12
    rows prefetch the next block into L2 instead (where ``set_prefetch`` is on), and 1-4 rows nothing
    (cpu_bf16_tile.h, bench/RESULTS.md)."""
    return bool(torch.ops.etr_cpu_linear.set_stream_hint(bool(on)))


def set_one_walk(on: bool) -> bool:
    """Turn the GEMM's one tile for up to 12 rows on or off in this op (on unless ``ETR_CPU_GEMM_ONE_WALK=0``; the
    decode step's op has its own copy, ``cpu_decode_step.set_one_walk``) and return the previous setting. It
    changes timings only, never a result: on, up to 12 rows (and the last up-to-12 rows of more) run as one row
    tile, one walk of each weight block; off, as tiles of 8, 4 and less (5-8 rows as 4 and the rest), whose
    smaller tiles walk the block again at a rate the dot instruction's latency sets (cpu_bf16_tile.h,
    bench/RESULTS.md)."""
    return bool(torch.ops.etr_cpu_linear.set_one_walk(bool(on)))


def dot_peak(iterations: int = 2_000_000) -> float | None:
    """GFLOP/s of the bf16 dot instruction on all of torch's threads (registers only, best of 3; 2 FLOPs per
    multiply-add), or None where the op runs without the instruction. On a CPU without AMX it is the rate no
    bf16 GEMM there can beat: bench/scaling.py draws each step's compute floor from it."""
    if not built() or not torch.ops.etr_cpu_linear.native():
        return None
    return float(torch.ops.etr_cpu_linear.dot_peak(int(iterations)))


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear`` in plain torch: the linear in float32, rounded to bf16."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
