"""Torch C++ ops of this package, compiled on first use with the machine's C++ compiler (``-march=native``;
each build is cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, in ``etr/``).
A source, a header it includes, the compiler flags, the torch installation (each virtualenv its own) or the CPU
that changes gets a build of its own. Where an op
cannot be built, its caller keeps a plain-torch path; ``CppOp.available()`` says which, ``CppOp.error`` why.

Processes that load an op at once (tests, Ray actors, several servers) take turns on an ``flock`` of its build
directory, which the kernel releases when its holder dies. torch's own lock file is not released that way: a
process killed while building left it behind, and every later load waited on it forever. Under the flock no
other process is building, so a torch lock file found there is such a leftover and is removed."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialized between processes there
    fcntl = None

FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]


class CppOp:
    """One C++ source built into one torch op library, loaded once per process."""

    def __init__(self, source: str, what: str, switch: str):
        self.source = Path(__file__).with_name(source)
        self.what, self.switch = what, switch  # what it is, for messages; the env variable that turns it off
        self.error: str | None = None
        self._loaded: bool | None = None

    def name(self) -> str:
        """The build's name: a new source, header, compiler flag, torch or CPU gets a new build (``-march=native``
        fits one CPU)."""
        from etr.kernels.cpu_gemm import cpu_flags
        key = (self.source.read_bytes() + b"".join(h.read_bytes() for h in self.headers())
               + " ".join(FLAGS).encode() + torch.__version__.encode() + torch.__file__.encode()
               + " ".join(sorted(cpu_flags())).encode())
        return f"etr_{self.source.stem}_" + hashlib.sha256(key).hexdigest()[:12]

    def headers(self) -> list[Path]:
        """The package's own headers the source includes (``#include "x.h"``, and what they include in turn),
        each found where the compiler finds a quoted include of ours (the build passes no ``-I`` of ours): beside
        the file that includes it, as reached (a symlinked header's includes beside the link, not its target).
        A header reached twice is listed once. A changed header gets a new build too; ``<x.h>`` headers are the
        system's and are not followed."""
        found, seen, todo = [], set(), [self.source]
        while todo:
            including = todo.pop()
            for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', including.read_text(), re.MULTILINE):
                path = including.parent / name
                if path.is_file() and path.resolve() not in seen:
                    seen.add(path.resolve())
                    found.append(path)
                    todo.append(path)
        return found

    def available(self) -> bool:
        """Whether the op is loaded, compiling it first if needed (tens of seconds the first time on a
        machine). ``{switch}=0`` in the environment turns it off."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def _load(self) -> bool:
        if os.environ.get(self.switch, "1") == "0":
            self.error = f"turned off by {self.switch}=0"
            return False
        try:
            from torch.utils import cpp_extension
            _find_ninja()
            name = self.name()
            root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
            build = Path(root) / "etr" / name
            build.mkdir(parents=True, exist_ok=True)
            with open(build / "etr.lock", "w") as turn:
                if fcntl is not None:
                    fcntl.flock(turn, fcntl.LOCK_EX)
                    (build / "lock").unlink(missing_ok=True)  # torch's, left by a builder that died
                if not (build / f"{name}.so").exists():
                    print(f"etr: building the {self.what} (once per machine) ...", file=sys.stderr, flush=True)
                cpp_extension.load(name, [str(self.source)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                                   build_directory=str(build), is_python_module=False, verbose=False)
        except Exception as e:  # noqa: BLE001 (no compiler, no ninja, a failed build: the torch path stays)
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            return False
        return True


def _find_ninja() -> None:
    """torch looks for ``ninja`` on PATH; the ``ninja`` package's binary sits in the virtualenv's bin, which
    is not on PATH unless the virtualenv is activated (nor in a Ray worker it starts)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
