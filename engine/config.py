"""The one config object of a model set (the meta, its experts, and how every model's engine runs).

Built once from the user's options, validated and resolved in ``__post_init__`` and never changed after:
``LLM``, the engines and their runners all read the same instance. What differs between the models of one
set (checkpoint, device, and the attention backend and page size that follow from the device) is derived
from it by ``backend_for`` and ``block_size_for``, not stored in copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch

from etr.engine.attention import block_size_for, resolve_backend
from etr.errors import ConfigError
from etr.models.config import load_model_config
from etr.options import parse_device, parse_dtype

META = "meta"  # the meta model's name wherever models are named (query sets, stats, metrics, reports)
DEFAULT_MAX_MODEL_LEN = 4096  # cap on the meta's max_position_embeddings when max_model_len is not given


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Every option of ``LLM`` (see its docstring for what each means), resolved.

    After construction ``dtype`` is a ``torch.dtype``, ``device`` a checked ``torch.device``,
    ``max_model_len`` an int (the meta's ``max_position_embeddings`` capped at 4096 when not given),
    ``expert_head`` a tuple of paths or None, and ``expert_devices`` maps every expert to its device.
    """
    model: str
    experts: dict[str, str] = field(default_factory=dict)
    expert_head: str | tuple[str, ...] | list[str] | None = None
    expert_devices: dict[str, str | torch.device] = field(default_factory=dict)
    dtype: str | torch.dtype = "auto"
    device: str | torch.device = "cpu"
    block_size: int | None = None  # None: the backend's page size (16; 256 for flash-attn)
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    mixed_batches: bool | None = None  # None: on for CUDA, off for the CPU (see mixed_batches_for)
    attention_backend: str = "auto"
    cuda_graphs: bool | None = None  # None: on for CUDA with a capturable backend
    fused_ops: bool = False  # Triton add+RMSNorm, rotary, SiLU-mul (see DecoderLM.use_fused_ops)
    expert_placement: dict[str, str] = field(default_factory=dict)  # expert -> "local" (default) or "ray"
    expert_resources: dict[str, dict[str, float]] = field(default_factory=dict)  # Ray resources of an actor
    ray_address: str | None = None  # None: a running cluster if there is one, else a local one
    ray_timeout_s: float = 120.0  # placing an expert's actor and loading its weights must finish in this time

    def __post_init__(self):
        self._check_ranges()
        device = parse_device(self.device)
        self._set(device=device, dtype=parse_dtype(self.dtype, device), model=str(self.model))
        if self.max_model_len is None:
            meta = load_model_config(self.model)
            self._set(max_model_len=min(meta.max_position_embeddings, DEFAULT_MAX_MODEL_LEN))
        experts = {str(k): str(v) for k, v in (self.experts or {}).items()}
        stray = sorted(set(self.expert_devices or {}) - set(experts))
        if stray:
            raise ConfigError(f"expert_devices names unknown expert(s) {stray} (experts: {sorted(experts)})")
        placement = self._placement(experts)
        # A remote expert's device names a device of its actor's node: it is checked there, not here.
        devices = {name: (torch.device if placement[name] == "ray" else parse_device)(
            (self.expert_devices or {}).get(name, device)) for name in experts}
        head = self.expert_head
        heads = None if head is None else [head] if isinstance(head, (str, os.PathLike)) else list(head)
        self._set(experts=experts, expert_devices=devices, expert_placement=placement,
                  expert_head=None if heads is None else tuple(str(h) for h in heads))
        for name, dev in {META: device, **devices}.items():  # a bad backend or page size fails here, before any load
            if placement.get(name) != "ray":
                self.block_size_for(dev)

    def _placement(self, experts: dict[str, str]) -> dict[str, str]:
        given = dict(self.expert_placement or {})
        for option, names in (("expert_placement", given), ("expert_resources", self.expert_resources or {})):
            stray = sorted(set(names) - set(experts))
            if stray:
                raise ConfigError(f"{option} names unknown expert(s) {stray} (experts: {sorted(experts)})")
        bad = {n: p for n, p in given.items() if p not in ("local", "ray")}
        if bad:
            raise ConfigError(f"expert_placement {bad}: use 'local' or 'ray'")
        local = sorted(n for n in (self.expert_resources or {}) if given.get(n) != "ray")
        if local:
            raise ConfigError(f"expert_resources given for expert(s) {local} that are not placed on Ray")
        if self.ray_timeout_s <= 0:
            raise ConfigError(f"ray_timeout_s={self.ray_timeout_s!r} must be > 0")
        return {name: given.get(name, "local") for name in experts}

    @property
    def remote_experts(self) -> list[str]:
        """Names of the experts placed in Ray actors."""
        return [n for n, p in self.expert_placement.items() if p == "ray"]

    def _check_ranges(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be an int >= 1")
        if self.mixed_batches not in (None, True, False):
            raise ConfigError(f"mixed_batches={self.mixed_batches!r} must be True, False or None (auto)")
        for name in ("block_size", "max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} must be an int >= 1 (or None)")

    def _set(self, **values) -> None:
        for name, value in values.items():  # frozen: only __post_init__ resolves fields
            object.__setattr__(self, name, value)

    def backend_for(self, device: torch.device) -> str:
        """The attention backend a model on ``device`` uses ("auto" resolved)."""
        return resolve_backend(self.attention_backend, device)

    def mixed_batches_for(self, device: torch.device) -> bool:
        """Whether a model on ``device`` prefills arrivals in its running requests' decode step: as given, else
        on CUDA only. On the CPU a step costs about its token count whatever the mix, so mixing saved under 8%
        of the work and delayed first tokens (bench/RESULTS.md, serving under load)."""
        return torch.device(device).type == "cuda" if self.mixed_batches is None else self.mixed_batches

    def block_size_for(self, device: torch.device) -> int:
        """The KV page size of a model on ``device`` (given, or the backend's)."""
        return block_size_for(self.backend_for(device), self.block_size)

    def to_dict(self) -> dict:
        """The resolved options as plain values (for logs and reports)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value):
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value
