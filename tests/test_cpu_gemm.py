"""The CPU bf16 GEMM choice: native bf16 where the CPU has bf16 instructions, fp32 GEMMs elsewhere."""

import pytest
import torch
import torch.nn.functional as F

from etr.kernels import cpu_gemm


@pytest.mark.parametrize("flags,lacks", [({"avx2", "fma"}, True), ({"avx512f", "avx512_bf16"}, False),
                                         ({"avx2", "amx_bf16"}, False)])
def test_native_bf16_read_from_the_cpu_flags(flags, lacks, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "cpu_flags", lambda: flags)
    assert cpu_gemm.cpu_lacks_native_bf16() is lacks
    assert cpu_gemm.wants_fp32_gemm(torch.device("cpu"), torch.bfloat16) is lacks
    assert not cpu_gemm.wants_fp32_gemm(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("rows", [1, 3, 8, 17])
def test_fp32_backed_linear_equals_a_bf16_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(37, 50, generator=g).bfloat16(), torch.randn(37, generator=g).bfloat16()
    x = torch.randn(rows, 50, generator=g).bfloat16()
    got = cpu_gemm.Bf16ViaFp32Linear(w, b)(x)
    want = F.linear(x.float(), w.float(), b.float())  # bf16 inputs, fp32 accumulation, one rounding
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1.6e-2)


needs_packing = pytest.mark.skipif(not cpu_gemm.packed_bf16_available(), reason="torch without oneDNN prepacking")


@needs_packing
@pytest.mark.parametrize("rows", [1, 3, 16, 70])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["etr", "onednn"])
def test_packed_linear_equals_a_bf16_linear(rows, bias, kind, monkeypatch):
    from etr.kernels import cpu_bf16_linear
    if kind == "onednn":  # what CPUs with AMX (or without the package's op) run
        monkeypatch.setattr(cpu_bf16_linear, "available", lambda: False)
    elif not cpu_bf16_linear.available():
        pytest.skip(f"the package's bf16 linear is not for this CPU: {cpu_bf16_linear.load_error()}")
    g = torch.Generator().manual_seed(rows + bias)
    w = torch.randn(97, 40, generator=g).bfloat16()
    b = torch.randn(97, generator=g).bfloat16() if bias else None
    x = torch.randn(40, rows, generator=g).bfloat16().t()  # a non-contiguous input
    lin = cpu_gemm.PackedBf16Linear(w, b)
    got = lin(x)
    assert lin.kind == kind and got.shape == (rows, 97) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-2, rtol=8e-3)  # within 1 bf16 ulp


@needs_packing
def test_packed_model_keeps_its_plain_head(tiny_dir):
    """Every layer packed, a packed copy of the head; the plain head (tied to the embedding) stays."""
    from etr.models import load_model
    model = load_model(tiny_dir("llama_tied_gqa"), torch.bfloat16, "cpu")
    plain = model.lm_head_weight
    hidden = torch.randn(3, model.config.hidden_size).bfloat16()
    want = F.linear(hidden, plain)
    cpu_gemm.use_packed_bf16(model)
    assert model.lm_head_weight is plain and not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    torch.testing.assert_close(model.compute_logits(hidden), want, atol=2e-2, rtol=8e-3)


@pytest.mark.parametrize("flags,packed", [({"avx2"}, False), ({"avx512_bf16"}, True)])
def test_packing_chosen_only_with_native_bf16(flags, packed, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu_gemm, "packed_bf16_available", lambda: True)
    assert cpu_gemm.wants_packed_bf16(torch.device("cpu"), torch.bfloat16) is packed
    assert not cpu_gemm.wants_packed_bf16(torch.device("cpu"), torch.float32)
