"""How the GPU suite runs where it is sent: from a checkout nobody installed, one step per process.

A lent GPU machine gets the checkout as source only, and its command is killed, output and all, at its time
limit. So ``importable_from_source`` makes ``import etr`` work without an install, and ``run_step`` runs each
step in a process of its own with a deadline: a CUDA fault (which poisons the whole process's context) or a
hang costs that step's figures only, and the table still prints.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("engine", "kernels", "models", "routing")  # top-level folders installed as etr.<name> (pyproject)


def source_tree(tree: Path) -> Path:
    """Lay out the installed package ``etr`` (etr/ with the subpackages inside) in ``tree`` as symlinks
    into the checkout; returns ``tree``."""
    (tree / "etr").mkdir(parents=True)
    for item in (ROOT / "etr").iterdir():
        (tree / "etr" / item.name).symlink_to(item)
    for name in SUBPACKAGES:
        (tree / "etr" / name).symlink_to(ROOT / name)
    return tree


def importable_from_source() -> Path | None:
    """Make ``import etr`` work where the checkout arrived as source and nothing was installed (the GPU
    machine): the installed layout, built of symlinks in a temporary folder, goes first on ``sys.path`` and
    on ``PYTHONPATH`` (for child processes). Returns that folder; None where ``etr`` already imports."""
    try:
        import etr.engine  # noqa: F401
        return None
    except ModuleNotFoundError:
        for name in [m for m in sys.modules if m == "etr" or m.startswith("etr.")]:
            del sys.modules[name]
    tree = source_tree(Path(tempfile.mkdtemp(prefix="etr-source-")))
    atexit.register(shutil.rmtree, tree, ignore_errors=True)  # symlinks only: the checkout is untouched
    sys.path.insert(0, str(tree))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    return tree


def run_step(step: str, suite_args: list[str], workdir: Path, timeout_s: float) -> dict:
    """Run ``gpu_suite.py --only STEP`` (plus ``suite_args``) in a child process, killed with everything it
    started after ``timeout_s`` seconds; returns its result, or an error saying how it ended (with the end of
    its stderr). Not started from the checkout's root, whose ``etr`` folder (the facade alone) would shadow a
    source tree on PYTHONPATH."""
    out = workdir / f"step-{step}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--only", step, "--out", str(out),
           "--workdir", str(workdir), *suite_args]
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir,
                          start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's own children too (pytest, for the tests step)
            _, stderr = proc.communicate()
            return {"error": f"killed after {time.perf_counter() - start:.0f} s: past the suite's deadline",
                    "trace": stderr[-3000:]}
    if out.exists():
        return json.loads(out.read_text())[step]
    return {"error": f"process ended with code {proc.returncode} before writing its result",
            "trace": stderr[-3000:]}
