"""The one-row bf16 GEMV op (kernels/cpu_gemv.cpp) against float64 arithmetic on awkward sizes, and the
prepacked linear that routes one-row inputs to it.

Tolerance, per output: |got - exact| <= 2**-8 |exact| + 2e-4 sum_k |w_k x_k|, the exact value computed in float64
from the same bf16 inputs. The first term is one rounding to bf16 (at most 2**-9 relative, doubled for slack);
the second bounds float32 accumulation over up to 1,536 terms (k * 2**-24 * sum |w x| <= 9.2e-5 of it)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import require_cpp_op

from etr.kernels import cpu_gemm
from etr.kernels import cpu_gemv as G


@pytest.fixture(scope="module")
def op():
    require_cpp_op(G, "CPU bf16 GEMV op")


def within_tolerance(got, x, w, b, want=None, times=1):
    """``got`` within the module's tolerance of the exact result (or within ``times`` it of ``want``)."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = 2**-8 * exact.abs() + 2e-4 * F.linear(x.double().abs(), w.double().abs())
    return bool(((got.double() - (exact if want is None else want.double())).abs() <= times * bound).all())


@pytest.mark.parametrize("rows, k", [(1, 1), (7, 31), (13, 33), (64, 576), (100, 1000), (577, 1536), (3, 95)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_exact_arithmetic(op, rows, k, bias):
    g = torch.Generator().manual_seed(rows * 7 + k + bias)
    w = torch.randn(rows, k, generator=g).bfloat16()
    b = torch.randn(rows, generator=g).bfloat16() if bias else None
    for shape in [(k,), (1, k), (1, 1, k)]:
        x = torch.randn(shape, generator=g).bfloat16()
        got = G.gemv(x, w, b)
        assert got.shape == (*shape[:-1], rows) and got.dtype == torch.bfloat16
        assert within_tolerance(got, x, w, b)
        want = G.reference(x, w, b)
        assert within_tolerance(want, x, w, b) and within_tolerance(got, x, w, b, want, times=2)


def test_gemv_reads_a_strided_input(op):
    w = torch.randn(40, 64).bfloat16()
    x = torch.randn(64, 2).bfloat16()[:, 0]  # a column: stride 2
    assert within_tolerance(G.gemv(x, w), x, w, None)


def test_gemv_names_what_it_cannot_take(op):
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match=r"one row of 16 inputs expected, got sizes \[2, 16\]"):
        G.gemv(torch.randn(2, 16).bfloat16(), w)
    with pytest.raises(RuntimeError, match="bf16 input and weight expected"):
        G.gemv(torch.randn(16), w.float())
    with pytest.raises(RuntimeError, match=r"contiguous \[out, in\] weight expected"):
        G.gemv(torch.randn(8).bfloat16(), w.t())
    with pytest.raises(RuntimeError, match="a bf16 bias of 8 expected"):
        G.gemv(torch.randn(16).bfloat16(), w, torch.randn(7).bfloat16())


@pytest.mark.skipif(not cpu_gemm.packed_bf16_available(), reason="torch without oneDNN prepacking")
def test_packed_linear_sends_one_row_to_the_gemv_and_more_to_onednn(op):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(97, 40, generator=g).bfloat16(), torch.randn(97, generator=g).bfloat16()
    lin = cpu_gemm.PackedBf16Linear(w, b)
    assert lin.weight is not None and torch.equal(lin.weight, w)
    one = torch.randn(1, 40, generator=g).bfloat16()
    assert torch.equal(lin(one), G.gemv(one, w, b))
    three = torch.randn(3, 40, generator=g).bfloat16()
    assert torch.equal(lin(three), torch.ops.mkldnn._linear_pointwise(three, lin.packed, b, "none", [], ""))


@pytest.mark.skipif(not cpu_gemm.packed_bf16_available(), reason="torch without oneDNN prepacking")
def test_off_switch_and_cpus_without_the_instruction(monkeypatch):
    monkeypatch.setenv("ETR_CPU_GEMV", "0")
    monkeypatch.setattr(G, "OP", G.CppOp("cpu_gemv.cpp", "CPU bf16 GEMV op", "ETR_CPU_GEMV"))
    assert not G.available() and G.load_error() == "turned off by ETR_CPU_GEMV=0"
    assert cpu_gemm.PackedBf16Linear(torch.randn(8, 16).bfloat16()).weight is None  # no second copy kept
    monkeypatch.delenv("ETR_CPU_GEMV")
    monkeypatch.setattr(G, "OP", G.CppOp("cpu_gemv.cpp", "CPU bf16 GEMV op", "ETR_CPU_GEMV"))
    monkeypatch.setattr(cpu_gemm, "cpu_flags", lambda: frozenset({"avx2"}))
    assert not G.available() and G.load_error() == "this CPU has no AVX512-BF16"
