"""Eq. 2: the summed negative log-likelihood of a response given its query, through the engine's models.

Sequences run as one flattened, cache-free batch; the log-partition is accumulated over vocabulary chunks so
``[tokens, vocab]`` float32 logits never exist at once.
"""

from __future__ import annotations

import torch

from etr.engine.attention import TorchAttentionBackend, causal_metadata
from etr.errors import InvalidPromptError
from etr.models.decoder import DecoderLM


def forward_uncached(model: DecoderLM, seqs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """Final hidden states of ``seqs`` run as one flattened, cache-free causal batch, and the offset at
    which each sequence starts in them."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor([t for s in seqs for t in s], device=device)
    positions = torch.tensor([p for s in seqs for p in range(len(s))], device=device)
    hidden = model(ids, positions, causal_metadata([len(s) for s in seqs], device), None, TorchAttentionBackend())
    starts = [0]
    for s in seqs[:-1]:
        starts.append(starts[-1] + len(s))
    return hidden, starts


@torch.no_grad()
def last_hidden(model: DecoderLM, seqs: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """``[len(seqs), d]`` float32 final hidden state at each sequence's last position."""
    rows = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        h, starts = forward_uncached(model, chunk)
        rows.append(h[[s + len(q) - 1 for s, q in zip(starts, chunk)]].float())
    return torch.cat(rows)


def chunked_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``logsumexp(hidden @ weight.T)`` per row in float32, ``chunk`` weight rows at a time."""
    return chunked_logsumexp_max(hidden, weight, chunk)[0]


def chunked_logsumexp_max(hidden: torch.Tensor, weight: torch.Tensor,
                          chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over ``weight``: per row the log-sum-exp of ``hidden @ weight.T``, its largest logit and that
    logit's index (the lowest index on a tie), all in float32."""
    h = hidden.float()
    lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
    best = torch.full((h.shape[0],), float("-inf"), device=h.device)
    index = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    for start in range(0, weight.shape[0], chunk):
        logits = h @ weight[start:start + chunk].float().T
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        value, i = logits.max(-1)
        better = value > best
        best, index = torch.where(better, value, best), torch.where(better, i + start, index)
    return lse, best, index


def target_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``hidden[i] @ weight[targets[i]]`` per row in float32."""
    return (hidden.float() * weight[targets].float()).sum(-1)


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Per-row ``logsumexp(hidden @ weight.T) - hidden @ weight[target]`` in float32."""
    return chunked_logsumexp(hidden, weight, chunk) - target_logits(hidden, weight, targets)


@torch.inference_mode()
def response_nll(model: DecoderLM, pairs: list[tuple[list[int], list[int]]], chunk: int = 8192) -> torch.Tensor:
    """Summed NLL of each response's tokens given its query (Eq. 2), one value per (query_ids, response_ids)."""
    for i, (query, response) in enumerate(pairs):
        if not query or not response:
            raise InvalidPromptError(f"pair {i}: query and response need at least one token each "
                                     f"(got {len(query)} and {len(response)})")
    device = model.embed_tokens.weight.device
    hidden, starts = forward_uncached(model, [q + r for q, r in pairs])
    rows, targets, owner = [], [], []
    for i, ((query, response), start) in enumerate(zip(pairs, starts)):
        # The hidden state before each response token predicts it.
        rows += range(start + len(query) - 1, start + len(query) + len(response) - 1)
        targets += response
        owner += [i] * len(response)
    nll = chunked_nll(hidden[rows], model.lm_head_weight, torch.tensor(targets, device=device), chunk)
    return torch.zeros(len(pairs), device=device).index_add_(0, torch.tensor(owner, device=device), nll).cpu()
