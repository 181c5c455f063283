"""The fused elementwise kernels (residual add + RMSNorm, rotary, SiLU-mul), interpreted on the CPU, against
their torch references on awkward sizes. Tolerances: float32 1e-5; bfloat16 2 ulp (the fused kernels round
once where the references' torch ops may round twice)."""

import pytest
import torch

pytest.importorskip("triton")

from etr.kernels.fused_norm import fused_add_rms_norm, fused_add_rms_norm_reference  # noqa: E402
from etr.kernels.rotary import rotary_, rotary_reference  # noqa: E402
from etr.kernels.silu_mul import silu_mul, silu_mul_reference  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 8), (5, 100), (3, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(tokens, hidden, with_residual, dtype):
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(tokens, hidden, generator=g) * 3).to(dtype)
    residual = torch.randn(tokens, hidden, generator=g).to(dtype) if with_residual else None
    weight = torch.rand(hidden, generator=g).to(dtype) + 0.5
    got, got_sum = fused_add_rms_norm(x, residual, weight, 1e-6)
    want, want_sum = fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    if dtype == torch.float32:
        assert torch.equal(got_sum, want_sum)  # the residual stream is the plain add, bit for bit
    else:  # the interpreter rounds fp32 -> bf16 toward zero (compiled: to nearest even, tests/test_gpu.py)
        torch.testing.assert_close(got_sum, want_sum, atol=0, rtol=2 ** -7)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,dim", [(1, 1, 8), (7, 6, 40), (4, 11, 64)])
def test_rotary_in_place_on_a_strided_view(tokens, heads, dim, dtype):
    g = torch.Generator().manual_seed(tokens * heads)
    max_pos = 50
    freqs = torch.rand(dim // 2, generator=g) * torch.arange(max_pos)[:, None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    fused = torch.randn(tokens, (heads + 3) * dim, generator=g).to(dtype)  # q/k heads, then 3 untouched
    positions = torch.randint(0, max_pos, (tokens,), generator=g)
    x = fused[:, :heads * dim].view(tokens, heads, dim)
    want = rotary_reference(x.clone(), positions, cos, sin)
    tail = fused[:, heads * dim:].clone()
    assert rotary_(x, positions, cos, sin) is x
    torch.testing.assert_close(x, want, **TOL[dtype])
    assert torch.equal(fused[:, heads * dim:], tail)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 3), (6, 90), (2, 1500)])  # 1500: two programs per token
def test_silu_mul(tokens, inter, dtype):
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(tokens, 2 * inter, generator=g) * 4).to(dtype)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_reference(gate_up), **TOL[dtype])
