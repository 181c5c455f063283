"""Turns last-position logits into next tokens: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Sampling uses the exponential-race form: ``argmax(p / E)`` with ``E ~ Exp(1)`` drawn per row from the
request's own generator, which is an exact draw from ``p`` and depends on nothing else in the batch.
"""

from __future__ import annotations

import torch

from etr.engine.pending_step import host_to_device
from etr.engine.sequence import Sequence
from etr.kernels import cpu_argmax


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude, row by row. ``top_k <= 0`` disables it for a row."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    remove = rank >= k
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p; the first token always stays.
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Turns last-position logits into one token per sequence (greedy or sampled)."""
    def __init__(self, eos_token_ids: tuple[int, ...] = (), device: torch.device | str | None = None):
        self.eos_token_ids = tuple(eos_token_ids)
        # Asked here, so that a first build of the op happens while the engine starts, not in a request.
        self.cpu_argmax = device is not None and torch.device(device).type == "cpu" and cpu_argmax.available()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Next tokens ``[B]`` on the logits' device; nothing here waits for the device."""
        logits = self._suppress_early_stops(logits, seqs)
        greedy = [s.params.greedy for s in seqs]
        tokens = self._argmax(logits)
        if all(greedy):
            return tokens
        rows = host_to_device([i for i, g in enumerate(greedy) if not g], torch.long, logits.device)
        tokens[rows] = self._sample(logits[rows].float(), [s for s, g in zip(seqs, greedy) if not g])
        return tokens

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The first index of each row's maximum (bf16 values compare exactly, so no float32 copy is needed).
        On the CPU the package's op; elsewhere max(dim).indices, which is argmax and was faster than it on the
        CPU (bench/RESULTS.md)."""
        if self.cpu_argmax and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16):
            return cpu_argmax.argmax_rows(logits)
        return logits.max(dim=-1).indices

    def _suppress_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Until ``min_tokens`` are out, EOS (unless ignored) and stop ids cannot be drawn."""
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                rows += [i] * len(banned)
                cols += banned
        if rows:
            logits = logits.float()  # a copy for bf16 logits; float32 ones are written in place, as they were
            index = host_to_device([rows, cols], torch.long, logits.device)
            logits[index[0], index[1]] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device

        def per_row(name: str, dtype: torch.dtype) -> torch.Tensor:
            return host_to_device([getattr(s.params, name) for s in seqs], dtype, device)
        logits = logits / per_row("temperature", torch.float32)[:, None]
        if any(s.params.top_k > 0 or s.params.top_p < 1 or s.params.min_p > 0 for s in seqs):
            logits = filter_logits(logits, per_row("top_k", torch.long), per_row("top_p", torch.float32),
                                   per_row("min_p", torch.float32))
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            g = seq.generator
            if g is not None and g.device != noise.device:  # a request that moved to an expert on another device
                noise[i] = torch.empty(noise.shape[1], device=g.device).exponential_(generator=g).to(noise.device)
            else:
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)
