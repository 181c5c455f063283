"""Expert head files: the trained expert-token rows W_E that extend the meta model's LM head.

A head file is safetensors with one tensor, ``expert_embeddings`` ``[n_experts, hidden_size]``, and metadata
``experts`` (JSON list of names in row order) plus, optionally, ``hidden_size``, ``vocab_size`` and
``meta_fingerprint``. Several files concatenate in order: that is dynamic extension (new experts' rows are
trained alone and merged).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from etr.atomic_write import atomic_path
from etr.errors import ExpertHeadError

TENSOR = "expert_embeddings"


@dataclass(slots=True)
class ExpertHead:
    """Expert-token rows ``[n_experts, hidden]`` with their names and provenance."""
    names: list[str]
    embeddings: torch.Tensor  # [n_experts, hidden_size]
    hidden_size: int | None = None
    vocab_size: int | None = None
    meta_fingerprint: str | None = None
    sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.names):
            raise ExpertHeadError(f"expert_embeddings of shape {tuple(self.embeddings.shape)} does not hold one row "
                                  f"per expert name ({len(self.names)}: {self.names})")
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise ExpertHeadError(f"duplicate expert name(s) {dupes} in {self.sources or 'head'}")
        self.hidden_size = self.hidden_size or self.embeddings.shape[1]


def meta_fingerprint(lm_head_weight: torch.Tensor) -> str:
    """A short hash of the meta's LM head: identifies the model a head was trained against."""
    w = lm_head_weight.detach().cpu()
    # bf16-rounded sample rows: the same fingerprint whether the meta is loaded in float32 or bfloat16.
    probe = w[:: max(1, w.shape[0] // 64)].to(torch.bfloat16).float().contiguous()
    shape = f"{tuple(w.shape)}".encode()
    return hashlib.sha256(shape + probe.numpy().tobytes()).hexdigest()[:16]


def save_expert_head(path: str | Path, head: ExpertHead) -> Path:
    """Write ``head`` as a head file (atomically: a temporary file renamed into place)."""
    path = Path(path)
    meta = {"experts": json.dumps(head.names), "hidden_size": str(head.hidden_size)}
    if head.vocab_size is not None:
        meta["vocab_size"] = str(head.vocab_size)
    if head.meta_fingerprint:
        meta["meta_fingerprint"] = head.meta_fingerprint
    with atomic_path(path) as tmp:
        save_file({TENSOR: head.embeddings.detach().contiguous().cpu()}, tmp, metadata=meta)
    return path


def load_one(path: str | Path) -> ExpertHead:
    """Read one head file, checking its names, shape and metadata."""
    path = Path(path)
    if not path.is_file():
        raise ExpertHeadError(f"expert head file {str(path)!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if TENSOR not in f.keys():
                raise ExpertHeadError(f"{path}: no tensor {TENSOR!r} (has {list(f.keys())})")
            tensor = f.get_tensor(TENSOR)
    except ExpertHeadError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ExpertHeadError(f"{path}: not a readable safetensors file: {e}") from None
    try:
        names = json.loads(meta["experts"])
    except (KeyError, json.JSONDecodeError):
        raise ExpertHeadError(f"{path}: metadata 'experts' (a JSON list of names) is missing or invalid") from None
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ExpertHeadError(f"{path}: {TENSOR} has dtype {tensor.dtype}; expected float32 or bfloat16")
    as_int = lambda k: int(meta[k]) if k in meta else None  # noqa: E731
    head = ExpertHead(names, tensor, None, as_int("vocab_size"), meta.get("meta_fingerprint"), [str(path)])
    if as_int("hidden_size") not in (None, tensor.shape[1]):
        raise ExpertHeadError(f"{path}: metadata hidden_size={meta['hidden_size']} but rows have {tensor.shape[1]}")
    return head


def merge_heads(heads: list[ExpertHead]) -> ExpertHead:
    """Concatenate heads in order; they must agree on hidden size, vocab size and meta fingerprint."""
    if not heads:
        raise ExpertHeadError("no expert head given")
    for field_name in ("hidden_size", "vocab_size", "meta_fingerprint"):
        values = {getattr(h, field_name) for h in heads} - {None}
        if len(values) > 1:
            raise ExpertHeadError(f"head files disagree on {field_name}: {sorted(map(str, values))} "
                                  f"({[s for h in heads for s in h.sources]})")
    first = heads[0]
    pick = lambda f: next((getattr(h, f) for h in heads if getattr(h, f) is not None), None)  # noqa: E731
    return ExpertHead([n for h in heads for n in h.names],
                      torch.cat([h.embeddings.float() for h in heads]) if len(heads) > 1 else first.embeddings,
                      first.hidden_size, pick("vocab_size"), pick("meta_fingerprint"),
                      [s for h in heads for s in h.sources])


def load_expert_head(paths: str | Path | list[str | Path]) -> ExpertHead:
    """Load one head file or several (rows concatenated in the given order)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return merge_heads([load_one(p) for p in paths])
