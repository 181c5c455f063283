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
