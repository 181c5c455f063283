"""Tokenizer of a checkpoint directory, when it has one."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` ships tokenizer files."""
    return any((Path(model_dir) / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path):
    """The HF tokenizer saved in ``model_dir``, or None when the directory has no tokenizer files."""
    if not has_tokenizer(model_dir):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))
