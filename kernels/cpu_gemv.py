"""A bf16 linear of one row (GEMV) for decode at batch 1 on CPUs with AVX512-BF16 (``cpu_gemv.cpp``).

A batch-1 decode step reads every weight once, so its speed is the rate at which the weights stream in from
memory; this op reads them as one sequential run of whole rows per thread, which measured faster than oneDNN's
GEMV on prepacked weights (bench/RESULTS.md). ``PackedBf16Linear`` calls it for one-row inputs and keeps
oneDNN for more rows. Built on first use (kernels/cpp_op.py); it is used only where the CPU has AVX512-BF16
(``available()``), and ``ETR_CPU_GEMV=0`` turns it off. ``reference`` is the plain-torch computation it is
tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from etr.kernels.cpp_op import CppOp

OP = CppOp("cpu_gemv.cpp", "CPU bf16 GEMV op", "ETR_CPU_GEMV")


def available() -> bool:
    """Whether the op is loaded and fast here: the CPU has AVX512-BF16 (the op runs without it, slowly)."""
    from etr.kernels.cpu_gemm import cpu_flags
    if OP.error is None and OP._loaded is None and "avx512_bf16" not in cpu_flags():
        OP.error, OP._loaded = "this CPU has no AVX512-BF16", False
    return OP.available() and torch.ops.etr_cpu_gemv.native()


def load_error() -> str | None:
    """Why the op is not available (None when it is, or before ``available()`` was asked)."""
    return OP.error


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of one row (any leading dims of size 1), all bf16, ``weight``
    contiguous ``[out, in]``; float32 products and sums, rounded to bf16 once."""
    return torch.ops.etr_cpu_gemv.gemv(x, weight, bias)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gemv`` in plain torch: the linear in float32, rounded to bf16."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
