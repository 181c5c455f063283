"""Greedy decoding's argmax over each row of the logits on the CPU (``cpu_argmax.cpp``, a torch C++ op): the
index of each row's first maximum, or of its first NaN, as ``torch.max(dim=-1).indices`` answers, in a fraction
of its time (bench/RESULTS.md). Built on first use (kernels/cpp_op.py); where it cannot be built, or
``ETR_CPU_ARGMAX=0``, the sampler keeps torch's. ``reference`` is what it is tested against."""

from __future__ import annotations

import torch

from etr.kernels.cpp_op import CppOp

OP = CppOp("cpu_argmax.cpp", "CPU argmax op", "ETR_CPU_ARGMAX")


def available() -> bool:
    """Whether the op is loaded, compiling it first if needed (once per process)."""
    return OP.available()


def load_error() -> str | None:
    """Why the op is not available (None when it is, or before ``available()`` was asked)."""
    return OP.error


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """int64 ``[rows]``: the first index of each row's maximum (its first NaN where it has one); float32 or bf16
    ``[rows, n]`` logits on the CPU."""
    return torch.ops.etr_cpu_argmax.argmax_rows(logits)


def reference(logits: torch.Tensor) -> torch.Tensor:
    """``argmax_rows`` in plain torch."""
    return logits.max(dim=-1).indices
