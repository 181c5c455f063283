"""Load an HF checkpoint directory into :class:`DecoderLM`, tensor by tensor, straight into the target
dtype and device (weights are never materialised twice in float32)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from etr.errors import (CheckpointError, CorruptCheckpointError, MissingTensorError, TensorShapeError,
                        UnexpectedTensorError)
from etr.models.config import ModelConfig, load_model_config
from etr.models.decoder import DecoderLM

# Tensors some exporters write that carry nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(slots=True)
class Target:
    """Where one HF tensor goes: a parameter, and the row range of it for fused projections."""
    param: str
    start: int
    rows: int | None  # None: the whole parameter


def weight_map(cfg: ModelConfig) -> dict[str, Target]:
    """Every HF tensor name the config implies, mapped to its place in DecoderLM."""
    q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    m = {"model.embed_tokens.weight": Target("embed_tokens.weight", 0, None),
         "model.norm.weight": Target("norm.weight", 0, None)}
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = Target("lm_head.weight", 0, None)
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            m[f"{hf}{norm}.weight"] = Target(f"{ours}{norm}.weight", 0, None)
        kinds = ["weight"] + (["bias"] if cfg.attention_bias else [])
        for kind in kinds:
            for name, start, rows in (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)):
                m[f"{hf}self_attn.{name}.{kind}"] = Target(f"{ours}self_attn.qkv_proj.{kind}", start, rows)
        for kind in ["weight"] + (["bias"] if cfg.o_proj_bias else []):
            m[f"{hf}self_attn.o_proj.{kind}"] = Target(f"{ours}self_attn.o_proj.{kind}", 0, None)
        for kind in ["weight"] + (["bias"] if cfg.mlp_bias else []):
            m[f"{hf}mlp.gate_proj.{kind}"] = Target(f"{ours}mlp.gate_up_proj.{kind}", 0, inter)
            m[f"{hf}mlp.up_proj.{kind}"] = Target(f"{ours}mlp.gate_up_proj.{kind}", inter, inter)
            m[f"{hf}mlp.down_proj.{kind}"] = Target(f"{ours}mlp.down_proj.{kind}", 0, None)
    return m


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: single-file or sharded with an index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight")


def _copy_into(params: dict, target: Target, tensor: torch.Tensor, name: str, file: Path) -> None:
    param = params[target.param]
    dest = param.data if target.rows is None else param.data.narrow(0, target.start, target.rows)
    if tuple(tensor.shape) != tuple(dest.shape):
        raise TensorShapeError(f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                               f"the config implies {tuple(dest.shape)}")
    dest.copy_(tensor)


@contextlib.contextmanager
def _reading(file: Path):
    """Turn safetensors' own errors (a truncated or corrupt file) into one that names the file; errors of the
    copy that follows a read (out of memory, a shape) are not the file's and pass through as they are."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpointError(f"{file}: not a readable safetensors file: {type(e).__name__}: {e}") from e


def load_weights(model: DecoderLM, model_dir: Path) -> None:
    """Fill ``model``'s parameters from the checkpoint; every expected tensor must be found exactly once."""
    cfg = model.config
    expected, params = weight_map(cfg), dict(model.named_parameters())
    device = str(next(model.parameters()).device)
    files = weight_files(model_dir)
    seen: set[str] = set()
    for file in files:
        with _reading(file):
            handle = safe_open(file, framework="pt", device=device)
        with handle as f:
            for name in f.keys():
                if name not in expected:
                    if _ignorable(name, cfg):
                        continue
                    raise UnexpectedTensorError(f"{file.name}: tensor {name!r} has no place in a "
                                                f"{cfg.model_type} model with this config")
                with _reading(file):
                    tensor = f.get_tensor(name)
                _copy_into(params, expected[name], tensor, name, file)
                seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingTensorError(f"{model_dir}: tensor(s) {shown} not found in {[f.name for f in files]}")


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
               max_positions: int | None = None) -> DecoderLM:
    """Build a :class:`DecoderLM` from an HF checkpoint directory, in ``dtype`` on ``device``."""
    model_dir = Path(model_dir)
    cfg = load_model_config(model_dir)
    with torch.device("meta"):
        model = DecoderLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    load_weights(model, model_dir)
    model.init_rope(max_positions or cfg.max_position_embeddings)
    return model.eval().requires_grad_(False)
