"""The CPU argmax op (kernels/cpu_argmax.cpp) against torch.max(dim=-1).indices, exactly: awkward lengths (the
16-value loads' tails), ties (the first maximum wins), NaN anywhere (the first NaN wins), rows of -inf and +inf,
float32 and bf16, non-contiguous rows; and the sampler taking it for greedy rows on the CPU."""

import pytest
import torch
from conftest import require_cpp_op

from etr.engine.sampler import Sampler
from etr.engine.sampling_params import SamplingParams
from etr.engine.sequence import Sequence
from etr.kernels import cpu_argmax as A


@pytest.fixture(scope="module")
def op():
    require_cpp_op(A, "CPU argmax op")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 33, 1000, 49152, 49153])
def test_matches_torch_on_awkward_lengths(op, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(9, n, generator=g).to(dtype)
    x[1] = torch.randint(-3, 3, (n,), generator=g).to(dtype)  # many ties: the first maximum is the answer
    x[2] = float("-inf")
    x[3, n // 2] = float("inf")
    x[4, n - 1] = float("nan")  # in the tail (or the only value)
    x[5, 0] = float("nan")
    x[6, n // 3] = float("nan")
    x[6, n - 1] = float("nan")  # two NaNs: the first wins
    x[7, -1] = x[7].max() + 1  # the maximum last
    assert torch.equal(A.argmax_rows(x), A.reference(x))


def test_non_contiguous_rows_and_names_what_it_cannot_take(op):
    x = torch.randn(64, 100)[::2, 3:]
    assert torch.equal(A.argmax_rows(x), A.reference(x))
    with pytest.raises(RuntimeError, match=r"\[rows, n > 0\] logits expected, got sizes \[3\]"):
        A.argmax_rows(torch.randn(3))
    with pytest.raises(RuntimeError, match="float32 or bf16 logits expected, got Half"):
        A.argmax_rows(torch.randn(2, 3).half())


def test_the_sampler_takes_it_for_greedy_rows_on_the_cpu(op, monkeypatch):
    calls = []
    real = A.argmax_rows
    monkeypatch.setattr(A, "argmax_rows", lambda x: calls.append(x.shape) or real(x))
    seqs = [Sequence([1, 2, 3], SamplingParams(temperature=0.0), 16) for _ in range(3)]
    logits = torch.randn(3, 500).bfloat16()
    assert torch.equal(Sampler((), "cpu")(logits, seqs), logits.float().argmax(-1))
    assert calls == [(3, 500)]
    assert torch.equal(Sampler()(logits, seqs), logits.float().argmax(-1)) and len(calls) == 1  # no device: torch
