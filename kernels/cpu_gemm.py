"""The choice of bf16 linear layers on the CPU, by instruction set.

With native bf16 every ``nn.Linear`` becomes a ``PackedBf16Linear``: the package's own GEMM
(kernels/cpu_bf16_linear.py) on AVX512-BF16 CPUs without AMX, oneDNN's prepacked GEMM on AMX CPUs. Without
native bf16 (no AVX512-BF16 / AMX), oneDNN's bf16 GEMM
is fast for one row (a GEMV) but slows down linearly with more rows, while an fp32 GEMM of the same shape
stays flat (figures: bench/RESULTS.md, "Measurements behind code choices"). For batches of ``MIN_ROWS`` rows
or more we therefore multiply bf16 activations
by an fp32 copy of the (bf16-valued) weights and round the result back to bf16 — the same arithmetic a
bf16 GEMM with fp32 accumulation performs — and keep the bf16 GEMV for single rows. The fp32 copies cost
twice the bf16 weight memory, which is why this is on only where it pays.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from etr.kernels import huge_pages

MIN_ROWS = 8  # the crossover of a 49152x576 head (layers cross earlier); bench/RESULTS.md


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((frozenset(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                        frozenset())
    except OSError:
        return frozenset()


def cpu_lacks_native_bf16() -> bool:
    """True on CPUs without AVX512-BF16/AMX, where oneDNN's bf16 GEMMs are slow. (torch's capability string
    says only "AVX512" on an AVX512-BF16 Zen 4, so ask the flags, or torch's own probes.)"""
    flags = cpu_flags()
    if flags:
        return not any(f in flags for f in NATIVE_BF16_FLAGS)
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return not any(p is not None and p() for p in probes)


def wants_fp32_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether bf16 linears on ``device`` should run as float32 GEMMs."""
    return device.type == "cpu" and dtype == torch.bfloat16 and cpu_lacks_native_bf16()


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, weight32: torch.Tensor,
                bias: torch.Tensor | None = None, bias32: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for bf16 ``x``: fp32 GEMM on many rows, bf16 GEMV on few."""
    if x.shape[0] >= MIN_ROWS:
        return F.linear(x.float(), weight32, bias32).to(x.dtype)
    return F.linear(x, weight, bias)


class Bf16ViaFp32Linear(nn.Module):
    """Drop-in for a bf16 ``nn.Linear`` that keeps an fp32 copy of its weights for batched calls."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.weight32 = weight.float()
        self.bias32 = None if bias is None else bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_bf16(x, self.weight, self.weight32, self.bias, self.bias32)


def use_fp32_gemm(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (in place) and give it an fp32-backed LM head."""
    return _swap_linears(model, Bf16ViaFp32Linear)


@functools.cache
def packed_bf16_available() -> bool:
    """Whether this torch build can prepack a bf16 weight for oneDNN and multiply with it."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=torch.bfloat16), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=torch.bfloat16), w, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return True


def wants_packed_bf16(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether bf16 linears on ``device`` should run on oneDNN-prepacked weights (CPUs with native bf16)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and not cpu_lacks_native_bf16()
            and packed_bf16_available())


class PackedBf16Linear(nn.Module):
    """Drop-in for a bf16 ``nn.Linear`` whose weight is packed once for a CPU GEMM with native bf16: the
    package's own (kernels/cpu_bf16_linear.py: CPUs with AVX512-BF16 and no AMX; ``kind == "etr"``) or oneDNN's
    blocked layout (``kind == "onednn"``). Both are faster than ``F.linear`` at every batch size measured
    (bench/RESULTS.md); the plain weight is not kept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        from etr.kernels import cpu_bf16_linear
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.detach()
        if cpu_bf16_linear.available():
            self.kind, self.packed = "etr", cpu_bf16_linear.pack(weight)
        else:
            self.kind = "onednn"
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # tuned for decode rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "etr":
            return torch.ops.etr_cpu_linear.linear(x, self.packed, self.bias, self.out_features)
        if not x.is_contiguous():
            x = x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def use_packed_bf16(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (in place) for a prepacked one, and pack a copy of the LM head
    (the plain head stays: the embedding may share it, and the expert head reads it). The package's packed
    weights then move into one mapping on huge pages, in the order a step reads them (kernels/huge_pages.py)."""
    _swap_linears(model, PackedBf16Linear)
    huge_pages.move([m for m in model.modules() if isinstance(m, PackedBf16Linear) and m.kind == "etr"], "packed")
    return model


def _swap_linears(model: nn.Module, cls) -> nn.Module:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not getattr(model, "lm_head", None):
                setattr(module, child_name, cls(child.weight, child.bias))
    model.head_proj = cls(model.lm_head_weight)
    return model
