"""pytest-benchmark: the extended LM head (Triton kernel) against what the engine would do without it: two
matmuls (vocabulary rows, expert rows) and an argmax over both, or one matmul over a concatenated copy of the
weights made once and cached. (``torch.cat`` of the whole weight on every call, the old baseline, is kept for
reference: no engine does that.)

On CUDA the kernel runs compiled at Qwen-7B shapes. On the CPU it can only run interpreted, which measures
the interpreter rather than the kernel, so the CPU run uses small shapes and exists to keep the harness
working; read GPU figures from bench/gpu_suite.py.

    .venv/bin/python -m pytest bench/test_bench_lm_head.py --benchmark-group-by=param:B
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from etr.kernels.lm_head import extended_argmax  # noqa: E402

V, D, E = (151_936, 4096, 6) if CUDA else (2003, 96, 6)
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(V, D, generator=g).to(DEVICE, DTYPE), torch.randn(E, D, generator=g).to(DEVICE, DTYPE))


def _sync(x):
    if CUDA:
        torch.cuda.synchronize()
    return x


@pytest.mark.parametrize("B", [1, 8, 64])
def test_kernel_greedy(benchmark, weights, B):
    wv, we = weights
    h = torch.randn(B, D, device=DEVICE, dtype=DTYPE)
    got = benchmark(lambda: _sync(extended_argmax(h, wv, we)))
    logits = h.float() @ torch.cat([wv, we]).float().T
    # bf16 inputs: the kernel's pick must be a maximum up to fp32 summation-order differences.
    chosen = logits.gather(1, got[:, None]).squeeze(1)
    assert (chosen >= logits.max(1).values - 1e-2 * logits.abs().max()).all()


@pytest.mark.parametrize("B", [1, 8, 64])
def test_two_matmuls_argmax(benchmark, weights, B):
    wv, we = weights
    h = torch.randn(B, D, device=DEVICE, dtype=DTYPE)
    got = benchmark(lambda: _sync(torch.cat([h @ wv.T, h @ we.T], dim=-1).argmax(-1)))
    assert got.shape == (B,)


@pytest.mark.parametrize("B", [1, 8, 64])
def test_cached_concat_matmul_argmax(benchmark, weights, B):
    wv, we = weights
    cached = torch.cat([wv, we])  # made once, as an engine without the kernel would keep it
    h = torch.randn(B, D, device=DEVICE, dtype=DTYPE)
    got = benchmark(lambda: _sync((h @ cached.T).argmax(-1)))
    assert got.shape == (B,)


@pytest.mark.parametrize("B", [1, 8, 64])
def test_torch_cat_matmul_argmax(benchmark, weights, B):
    wv, we = weights
    h = torch.randn(B, D, device=DEVICE, dtype=DTYPE)
    benchmark(lambda: _sync((h @ torch.cat([wv, we]).T).argmax(-1)))
