"""Eq. 2 through the engine's own model, chunked over the vocabulary, against transformers' cross-entropy."""

import pytest
import torch

from etr.errors import InvalidPromptError
from etr.models import load_model
from etr.routing.nll import response_nll


@pytest.mark.parametrize("chunk", [7, 100, 8192])  # 260-token vocabulary: ragged chunks, and one chunk
def test_response_nll_matches_hf(chunk, tiny_dir, hf_model_of):
    path = tiny_dir("qwen2_untied")
    pairs = [([1, 2, 3], [4, 5]), ([9] * 20, [7, 8, 9, 10, 11]), ([200], [100])]
    got = response_nll(load_model(path, torch.float32, "cpu", max_positions=64), pairs, chunk=chunk)
    hf = hf_model_of(path)
    want = []
    for q, r in pairs:
        ids = torch.tensor([q + r])
        with torch.no_grad():
            logits = hf(ids).logits[0, len(q) - 1:-1]
        want.append(torch.nn.functional.cross_entropy(logits, torch.tensor(r), reduction="sum"))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=1e-5)


def test_empty_response_refused(tiny_dir):
    with pytest.raises(InvalidPromptError, match="pair 0.*got 1 and 0"):
        response_nll(load_model(tiny_dir("qwen2_untied"), torch.float32, "cpu", max_positions=64), [([1], [])])
