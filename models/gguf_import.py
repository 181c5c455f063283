"""Turn a GGUF file into an ordinary HF checkpoint directory (dequantized by transformers)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from etr.errors import GGUFImportError

_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "transformers_version")


def import_gguf(src: str | Path, dest: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``dest`` with config.json (no quantization fields), model.safetensors, tokenizer and generation
    config. The directory appears whole or not at all: it is built beside ``dest`` and renamed into place."""
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise GGUFImportError(f"GGUF file {str(src)!r} does not exist")
    if dest.exists():
        raise GGUFImportError(f"destination {str(dest)!r} already exists; remove it or choose another")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from safetensors.torch import save_file
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=dtype)
    except ImportError as e:
        raise GGUFImportError(f"GGUF import needs the [gguf] extra (gguf, accelerate): {e}") from None
    except (ValueError, OSError, KeyError) as e:
        raise GGUFImportError(f"cannot read {src}: {e}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage, and it is redundant
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = {k: v for k, v in model.config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
        config["dtype"] = str(dtype).removeprefix("torch.")
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
