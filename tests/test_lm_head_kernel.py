"""The extended-LM-head Triton kernel (interpreted on the CPU) against its torch reference."""

import os

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from etr.kernels.lm_head import (extended_argmax, extended_argmax_reference, extended_logits,  # noqa: E402
                                 extended_logits_reference)

V, D = 397, 96  # neither is a multiple of the 64-wide tiles
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# Tolerances on logits of magnitude ~10: float32 tiles differ only in summation order; bf16 inputs are
# multiplied exactly in float32 by both paths, so again only summation order (and one rounding of the output).
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


def inputs(B, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=g).to(dtype).to(DEVICE)
    wv = torch.randn(V, D, generator=g).to(dtype).to(DEVICE)
    we = (torch.randn(E, D, generator=g) * 1.5).to(dtype).to(DEVICE)
    return h, wv, we


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,E", [(1, 1), (3, 2), (7, 5), (5, 4), (37, 2), (70, 3)])  # 37: one 64-row block; 70: two
def test_full_logits_match_reference(B, E, dtype):
    h, wv, we = inputs(B, E, dtype, seed=B * 10 + E)
    got = extended_logits(h, wv, we)
    want = extended_logits_reference(h.float(), wv.float(), we.float())
    assert got.shape == (B, V + E) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,E", [(1, 3), (4, 1), (7, 5), (70, 2)])
def test_argmax_matches_reference(B, E, dtype):
    h, wv, we = inputs(B, E, dtype, seed=100 + B * 10 + E)
    we[0] = h[0] * 3  # make row 0 route to expert 0 so both halves of the head win somewhere
    got = extended_argmax(h, wv, we)
    assert torch.equal(got.cpu(), extended_argmax_reference(h.float(), wv.float(), we.float()).cpu())
    assert got[0].item() == V


def test_ties_pick_lowest_index():
    h = torch.ones(2, D, device=DEVICE)
    wv = torch.zeros(V, D, device=DEVICE)
    wv[5] = wv[300] = 1.0  # equal maxima in different tiles
    we = torch.ones(2, D, device=DEVICE) * 0.5
    assert extended_argmax(h, wv, we).tolist() == [5, 5]
    we[1] = 1.0  # an expert row tying with vocab row 5 loses to the lower index
    assert extended_argmax(h, wv, we).tolist() == [5, 5]


def test_warm_up_runs_every_row_block():
    h, wv, we = inputs(1, 2, torch.float32, seed=5)
    from etr.kernels import lm_head
    calls = []
    real = lm_head._launch
    lm_head._launch = lambda h, *a, **k: calls.append(h.shape[0]) or real(h, *a, **k)
    try:
        lm_head.warm_up(wv, we, max_rows=20)
    finally:
        lm_head._launch = real
    assert calls == [1, 1, 17, 17]  # batches up to 20 use the 16- and 32-row blocks
