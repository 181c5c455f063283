"""Expert-token training (Eq. 4) on cached features.

The meta is frozen, so for a query q its last hidden state ``h_q`` and the vocabulary's log-partition
``logsumexp(W_V h_q)`` are constants: one forward per query, then every epoch only touches ``W_E``:
``loss = logaddexp(lse_V, logsumexp(W_E h)) - target_logit``, the target being an expert row or (for
negatives) the logit of a vocabulary token, also cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from etr.models.decoder import DecoderLM
from etr.routing.nll import chunked_logsumexp_max, last_hidden, target_logits


@dataclass(slots=True)
class Features:
    """Per-query constants of Eq. 4, computed once by ``query_features``."""
    hidden: torch.Tensor       # [N, d] float32, last-position hidden state of each query
    lse_vocab: torch.Tensor    # [N] logsumexp over the vocabulary rows
    target_expert: torch.Tensor  # [N] expert row index, or -1 for a vocabulary target
    vocab_logit: torch.Tensor  # [N] logit of the vocabulary target (0 where the target is an expert)
    max_vocab: torch.Tensor    # [N] the largest vocabulary logit (what an expert row must beat to be chosen)

    def subset(self, idx) -> "Features":
        return Features(self.hidden[idx], self.lse_vocab[idx], self.target_expert[idx], self.vocab_logit[idx],
                        self.max_vocab[idx])


@dataclass(slots=True)
class TrainConfig:
    """Optimizer settings (the paper's defaults); ``log`` collects one entry per step."""
    lr: float = 5e-4
    weight_decay: float = 1.0
    warmup_steps: int = 5
    batch_size: int = 16
    epochs: int = 5
    seed: int = 0
    log: list = field(default_factory=list)


MetaToken = tuple[str, int | None]


@torch.no_grad()  # not inference_mode: the features feed autograd during training
def query_features(model: DecoderLM, queries: list[list[int]], targets: list[int | MetaToken],
                   batch_size: int = 16) -> Features:
    """Cache ``h_q`` and ``logsumexp(W_V h_q)`` per query. ``targets[i]`` is an expert row (int), or for a
    negative ``("token", id)``: a vocabulary target, ``id=None`` meaning the meta's own greedy token, so
    training leaves the meta's answer alone and only learns not to route there."""
    h = last_hidden(model, queries, batch_size)
    w = model.lm_head_weight
    lse, max_vocab, argmax = chunked_logsumexp_max(h, w)
    is_token = [isinstance(t, tuple) for t in targets]
    own = torch.tensor([tok and t[1] is None for t, tok in zip(targets, is_token)])
    given = torch.tensor([t[1] if tok and t[1] is not None else 0 for t, tok in zip(targets, is_token)])
    token_ids = torch.where(own, argmax.cpu(), given)
    logit_token = target_logits(h, w, token_ids)
    expert = torch.tensor([-1 if tok else t for t, tok in zip(targets, is_token)])
    return Features(h, lse, expert, torch.where(expert < 0, logit_token, torch.zeros_like(logit_token)), max_vocab)


def routed_rows(f: Features, w_expert: torch.Tensor) -> torch.Tensor:
    """The expert row greedy decoding picks at each query (-1: a vocabulary token wins)."""
    value, row = (f.hidden @ w_expert.float().T).max(-1)
    return torch.where(value > f.max_vocab, row, torch.full_like(row, -1))


def routing_stats(f: Features, w_expert: torch.Tensor) -> dict:
    """Routing accuracy on positives (the target row is chosen) and false routing on negatives (some
    expert row is chosen where the meta should answer)."""
    chosen = routed_rows(f, w_expert)
    pos, neg = f.target_expert >= 0, f.target_expert < 0
    return {"positives": int(pos.sum()), "negatives": int(neg.sum()),
            "routing_accuracy": (chosen[pos] == f.target_expert[pos]).float().mean().item() if pos.any() else None,
            "false_routing": (chosen[neg] >= 0).float().mean().item() if neg.any() else None}


def decision_margins(f: Features, w_expert: torch.Tensor) -> torch.Tensor:
    """Per query, how far greedy decoding's right decision leads the best wrong one (in logits): the target
    row over every other row and the largest vocabulary logit, or for a vocabulary target the largest vocabulary
    logit over every row. Positive: greedy decoding decides right (``routed_rows``); negative: wrong; 0: a tie."""
    scores = torch.cat([f.hidden @ w_expert.float().T, f.max_vocab[:, None]], dim=1)
    target = f.target_expert.to(scores.device)
    right = torch.where(target >= 0, target, torch.full_like(target, scores.shape[1] - 1))
    right_score = scores.gather(1, right[:, None]).squeeze(1)
    return right_score - scores.scatter(1, right[:, None], float("-inf")).max(-1).values


def holdout_split(labels: list, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices to train on and to hold out: ``fraction`` of each label's items (at least one item stays in
    training per label; none is held out when ``fraction`` is 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction {fraction} must be in [0, 1)")
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for label in dict.fromkeys(labels):
        idx = [i for i, x in enumerate(labels) if x == label]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        k = min(int(len(idx) * fraction), len(idx) - 1)
        held += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(held)


def cached_loss(f: Features, w_expert: torch.Tensor) -> torch.Tensor:
    """Mean Eq. 4 loss from cached features; differentiable in ``w_expert``."""
    logits_e = f.hidden @ w_expert.T
    lse = torch.logaddexp(f.lse_vocab, torch.logsumexp(logits_e, dim=-1))
    target = torch.where(f.target_expert >= 0, logits_e.gather(1, f.target_expert.clamp(min=0)[:, None]).squeeze(1),
                         f.vocab_logit)
    return (lse - target).mean()


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at ``step``: linear warm-up, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_rows(f: Features, init: torch.Tensor, frozen: torch.Tensor | None = None,
               cfg: TrainConfig | None = None) -> torch.Tensor:
    """Train the rows ``init`` (``[E_new, d]``); ``frozen`` rows (dynamic extension) stay in the partition,
    placed before the new ones, and never change. Returns the new rows."""
    cfg = cfg or TrainConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    new = torch.nn.Parameter(init.clone().float())
    old = None if frozen is None else frozen.float()
    opt = torch.optim.AdamW([new], lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = f.hidden.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, cfg.warmup_steps))
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            batch = f.subset(idx)
            rows = new if old is None else torch.cat([old, new])
            loss = cached_loss(batch, rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            cfg.log.append({"epoch": epoch, "step": len(cfg.log), "loss": loss.item(), "lr": sched.get_last_lr()[0]})
    return new.detach()


def head_features(model: DecoderLM, rows: list[dict], order: list[str], names: list[str],
                  negatives: bool = True) -> tuple[Features, list]:
    """Features of the query-set rows of ``names`` (and of the negatives), each targeting its expert's row in
    ``order``; and each kept row's expert (None for a negative)."""
    keep = [r for r in rows if r["expert"] in names or (negatives and r["expert"] is None)]
    targets = [order.index(r["expert"]) if r["expert"] else ("token", None) for r in keep]
    return query_features(model, [r["query_ids"] for r in keep], targets), [r["expert"] for r in keep]


def initial_rows(model: DecoderLM, n: int) -> torch.Tensor:
    """``n`` new expert rows, each the mean of the vocabulary's rows."""
    return model.lm_head_weight.float().mean(0, keepdim=True).repeat(n, 1)


def train_head(model: DecoderLM, rows: list[dict], extra_names: list[str] = (), old=None, negatives: bool = True,
               holdout: float = 0.0, cfg: TrainConfig | None = None):
    """Train rows for the experts named in ``rows`` (query sets as written by ``etr collect``: ``expert``
    and ``query_ids``; ``expert: None`` marks a negative) and in ``extra_names``; with ``old`` (an
    ExpertHead) its rows stay frozen and the new ones are appended. Returns the merged head and the routing
    stats on the held-out share (None when nothing is held out)."""
    from etr.errors import ExpertHeadError
    from etr.models.expert_head import ExpertHead, meta_fingerprint
    cfg = cfg or TrainConfig()
    old_names = list(old.names) if old is not None else []
    names = sorted(({r["expert"] for r in rows if r["expert"]} | set(extra_names)) - set(old_names))
    if not names:
        raise ExpertHeadError("the query sets hold no expert that is not already in the head")
    order = old_names + names
    features, labels = head_features(model, rows, order, names, negatives)
    train_idx, held_idx = holdout_split(labels, holdout, cfg.seed)
    frozen = None if old is None else old.embeddings.float()
    new = train_rows(features.subset(train_idx), initial_rows(model, len(names)), frozen, cfg)
    weights = new if frozen is None else torch.cat([frozen, new])
    head = ExpertHead(order, weights, vocab_size=model.config.vocab_size,
                      meta_fingerprint=meta_fingerprint(model.lm_head_weight))
    held = routing_stats(features.subset(held_idx), weights) if held_idx else None
    return head, held
