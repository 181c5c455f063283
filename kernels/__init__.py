"""Triton kernels, each with a plain-torch reference beside it (installed as ``etr.kernels``)."""

import os


def interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (whose bf16 arithmetic is raw bits: kernels upcast)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
