"""Eq. 2: the summed negative log-likelihood of a response given its query, through the engine's models.

Sequences run as one flattened, cache-free batch; the log-partition is accumulated over vocabulary chunks so
``[tokens, vocab]`` float32 logits never exist at once.
"""

from __future__ import annotations

import torch

from etr.engine.attention import TorchAttentionBackend, causal_metadata
from etr.errors import InvalidPromptError
from etr.models.decoder import DecoderLM


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Per-row ``logsumexp(hidden @ weight.T) - hidden @ weight[target]`` in float32, ``chunk`` vocab rows at a time."""
    h = hidden.float()
    lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
    for start in range(0, weight.shape[0], chunk):
        lse = torch.logaddexp(lse, torch.logsumexp(h @ weight[start:start + chunk].float().T, dim=-1))
    return lse - (h * weight[targets].float()).sum(-1)


@torch.inference_mode()
def response_nll(model: DecoderLM, pairs: list[tuple[list[int], list[int]]], chunk: int = 8192) -> torch.Tensor:
    """Summed NLL of each response's tokens given its query (Eq. 2), one value per (query_ids, response_ids)."""
    for i, (query, response) in enumerate(pairs):
        if not query or not response:
            raise InvalidPromptError(f"pair {i}: query and response need at least one token each "
                                     f"(got {len(query)} and {len(response)})")
    device = model.embed_tokens.weight.device
    seqs = [q + r for q, r in pairs]
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    positions = torch.tensor([p for s in seqs for p in range(len(s))], device=device)
    hidden = model(ids, positions, causal_metadata([len(s) for s in seqs], device), None, TorchAttentionBackend())
    rows, targets, owner, start = [], [], [], 0
    for i, (query, response) in enumerate(pairs):
        # The hidden state before each response token predicts it.
        rows += range(start + len(query) - 1, start + len(query) + len(response) - 1)
        targets += response
        owner += [i] * len(response)
        start += len(query) + len(response)
    nll = chunked_nll(hidden[rows], model.lm_head_weight, torch.tensor(targets, device=device), chunk)
    return torch.zeros(len(pairs), device=device).index_add_(0, torch.tensor(owner, device=device), nll).cpu()
