"""The subset of an HF ``config.json`` the decoder needs, read once and validated."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from etr.errors import ConfigError, UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(slots=True)
class ModelConfig:
    """The fields of an HF config.json the decoder needs."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v bias (always on for Qwen2)
    o_proj_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_type: str = "default"
    rope_params: dict = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    path: str = ""


def _rope_section(raw: dict) -> dict:
    # transformers 5 writes "rope_parameters"; older checkpoints write "rope_theta" and "rope_scaling".
    params = dict(raw.get("rope_parameters") or {})
    if raw.get("rope_scaling"):
        params = {**raw["rope_scaling"], **params}
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config.json in {path.parent}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def eos_ids_of(model_dir: Path, raw: dict) -> tuple[int, ...]:
    """EOS ids from generation_config.json (all of them) and config.json, deduplicated, in order."""
    ids = list(_as_ids(raw.get("eos_token_id")))
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        ids = list(_as_ids(_read_json(gen_path).get("eos_token_id"))) + ids
    return tuple(dict.fromkeys(ids))


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate ``model_dir/config.json`` for the Llama or Qwen2 family."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {str(model_dir)!r} does not exist")
    path = model_dir / "config.json"
    raw = _read_json(path)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{path}: model_type {model_type!r} (architectures {raw.get('architectures')}) is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if raw.get("use_sliding_window"):
        raise ConfigError(f"{path}: use_sliding_window=true is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    rope = _rope_section(raw)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{path}: rope type {rope['rope_type']!r} is not supported; "
                          f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{path}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
    try:
        heads = raw["num_attention_heads"]
        bias = bool(raw.get("attention_bias", False))
        return ModelConfig(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bias,
            o_proj_bias=False if model_type == "qwen2" else bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope_theta=float(rope["rope_theta"]),
            rope_type=rope["rope_type"],
            rope_params=rope,
            eos_token_ids=eos_ids_of(model_dir, raw),
            bos_token_id=raw.get("bos_token_id"),
            path=str(model_dir),
        )
    except KeyError as e:
        raise ConfigError(f"{path}: required field {e.args[0]!r} is missing") from None
