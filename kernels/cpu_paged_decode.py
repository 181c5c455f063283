"""Decode attention on the CPU that reads the KV pages in place (``cpu_paged_decode.cpp``, a torch C++ op).

The torch backend's decode otherwise gathers every sequence's context out of its pages and converts it to
float32 as a whole, each step and each layer; this kernel reads each key and value row once where it lies,
with float32 arithmetic. It is compiled on first use with the machine's C++ compiler (``-march=native``;
torch caches the build under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), and where
it cannot be built the backend keeps the gather path (``available()`` says which, ``load_error()`` why).
``reference`` is the plain-torch computation it is tested against.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_paged_decode.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
_error: list[str] = []


def _name() -> str:
    """The build's name: a new source, torch or CPU gets a new build (``-march=native`` fits one CPU)."""
    from etr.kernels.cpu_gemm import cpu_flags
    key = SOURCE.read_bytes() + torch.__version__.encode() + " ".join(sorted(cpu_flags())).encode()
    return "etr_cpu_paged_decode_" + hashlib.sha256(key).hexdigest()[:12]


@functools.cache
def available() -> bool:
    """Whether the op is loaded, compiling it first if needed (once per process; tens of seconds the first
    time on a machine). ``ETR_CPU_PAGED_DECODE=0`` turns it off."""
    if os.environ.get("ETR_CPU_PAGED_DECODE", "1") == "0":
        _error.append("turned off by ETR_CPU_PAGED_DECODE=0")
        return False
    try:
        from torch.utils import cpp_extension
        _find_ninja()
        name = _name()
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        if not any(Path(root).glob(f"**/{name}/{name}.so")):  # torch nests it by Python version
            print("etr: building the CPU decode-attention op (once per machine) ...", file=sys.stderr, flush=True)
        cpp_extension.load(name, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 (no compiler, no ninja, a failed build: the gather path stays)
        _error.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
        return False
    return True


def _find_ninja() -> None:
    """torch looks for ``ninja`` on PATH; the ``ninja`` package's binary sits in the virtualenv's bin, which
    is not on PATH unless the virtualenv is activated (nor in a Ray worker it starts)."""
    import shutil
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load_error() -> str | None:
    """Why the op is not available (None when it is, or before ``available()`` was asked)."""
    return _error[-1] if _error else None


def paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence: ``q`` ``[B, H, D]`` against the first ``context_lens[b]`` positions of
    sequence b's pages (``[num_blocks, block_size, kv_heads, D]``, named by its row of ``block_tables``, int32);
    query head h reads KV head ``h // (H // kv_heads)``. Returns ``[B, H, D]`` in ``q``'s dtype."""
    return torch.ops.etr_cpu.paged_decode(q, k_pages, v_pages, block_tables, context_lens, scale)


def reference(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_tables: torch.Tensor,
              context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``paged_decode`` in plain torch, one sequence at a time, in float32."""
    block_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    out = torch.empty_like(q)
    for b, n in enumerate(context_lens.tolist()):
        pos = torch.arange(n)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_pages.flatten(0, 1)[slots].float().transpose(0, 1)  # [kv_heads, n, D]
        v = v_pages.flatten(0, 1)[slots].float().transpose(0, 1)
        qb = q[b].float().view(kv_heads, -1, q.shape[2])          # [kv_heads, group, D]
        probs = (qb @ k.transpose(1, 2) * scale).softmax(-1)
        out[b] = (probs @ v).reshape(q.shape[1], q.shape[2]).to(q.dtype)
    return out
