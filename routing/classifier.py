"""The router baseline: a linear classifier over the meta's last hidden state of the query, trained on the
same query sets as the expert tokens, with a "meta" class for queries no expert should take.

Unlike ETR it is a separate model that needs its own training and its own forward pass before decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from etr.atomic_write import atomic_path
from etr.engine.config import META
from etr.errors import CheckpointError



@dataclass(slots=True)
class QueryClassifier:
    """A linear classifier over standardized last hidden states; ``predict`` needs ``model`` set."""
    classes: list[str]      # expert names, and "meta" when trained with negatives
    weight: torch.Tensor    # [classes, d]
    bias: torch.Tensor      # [classes]
    mean: torch.Tensor      # [d] feature standardization
    scale: torch.Tensor     # [d]
    model: object = None    # the meta DecoderLM that makes features; set before predict

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ((hidden - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, prompts: list[list[int]]) -> list[str | None]:
        """Chosen expert per prompt, None for the meta."""
        from etr.routing.nll import last_hidden
        if self.model is None:
            raise CheckpointError("QueryClassifier.model is not set: load the meta and assign it first")
        choice = self.logits(last_hidden(self.model, prompts)).argmax(-1).tolist()
        return [None if self.classes[c] == META else self.classes[c] for c in choice]


def train_classifier(hidden: torch.Tensor, labels: list[str], epochs: int = 300, lr: float = 1e-2,
                     weight_decay: float = 1e-2, seed: int = 0) -> QueryClassifier:
    """Full-batch AdamW on standardized features; ``labels`` are expert names or "meta"."""
    classes = sorted(set(labels))
    torch.manual_seed(seed)
    mean, scale = hidden.mean(0), hidden.std(0).clamp(min=1e-6)
    x = (hidden - mean) / scale
    y = torch.tensor([classes.index(label) for label in labels])
    layer = torch.nn.Linear(hidden.shape[1], len(classes))
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return QueryClassifier(classes, layer.weight.detach(), layer.bias.detach(), mean, scale)


def train_router(model, rows: list[dict], seed: int = 0) -> QueryClassifier:
    """The baseline on query-set rows (``expert`` and ``query_ids``; negatives become the "meta" class)."""
    from etr.routing.nll import last_hidden
    hidden = last_hidden(model, [r["query_ids"] for r in rows])
    return train_classifier(hidden, [r["expert"] or META for r in rows], seed=seed)


def save_classifier(path: str | Path, clf: QueryClassifier) -> None:
    """Write a classifier to safetensors (class names in the metadata); whole or not at all."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({"weight": clf.weight.contiguous(), "bias": clf.bias, "mean": clf.mean, "scale": clf.scale},
                  str(tmp), metadata={"classes": json.dumps(clf.classes)})


def load_classifier(path: str | Path) -> QueryClassifier:
    """Read a classifier written by ``save_classifier``; its ``model`` is left unset."""
    from safetensors import safe_open
    if not Path(path).exists():
        raise CheckpointError(f"router classifier {path} does not exist")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if "classes" not in meta:
            raise CheckpointError(f"{path} is not a router classifier file (no 'classes' metadata)")
        t = {k: f.get_tensor(k) for k in ("weight", "bias", "mean", "scale")}
    return QueryClassifier(json.loads(meta["classes"]), t["weight"], t["bias"], t["mean"], t["scale"])
