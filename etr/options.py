"""Parsing of user-facing dtype and device arguments."""

from __future__ import annotations

import torch

from etr.errors import UnsupportedDeviceError, UnsupportedDTypeError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_device(device: str | torch.device) -> torch.device:
    """A torch.device from a string, checked to exist (UnsupportedDeviceError otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UnsupportedDeviceError(f"device {device!r} is not a valid torch device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedDeviceError(f"device {device!r} asked for, but CUDA is not available here")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise UnsupportedDeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise UnsupportedDeviceError(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise UnsupportedDTypeError(f"dtype {dtype!r} is not supported; use one of 'auto', "
                                f"{', '.join(repr(k) for k in DTYPES)}")
