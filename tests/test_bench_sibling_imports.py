"""bench/ scripts import each other (``from decode import decode_steps``). Python puts a script's folder on
``sys.path`` only without ``PYTHONSAFEPATH``, which the Makefile exports (README, "Working in a checkout"), so
``make bench`` broke at its end on ``from scaling import ...``. Every script that imports a sibling puts its own
folder on ``sys.path`` first."""

import ast
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
SIBLINGS = {p.stem for p in BENCH.glob("*.py")} - {"conftest"}  # host_overhead.py takes tests/conftest.py
INSERT = "sys.path.insert(0, str(Path(__file__).resolve().parent))"


def sibling_imports(tree: ast.Module) -> list[int]:
    """Line numbers of every import of a bench/ module, at any depth."""
    lines = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                 else [])
        if any(n.split(".")[0] in SIBLINGS for n in names):
            lines.append(node.lineno)
    return lines


def test_every_script_that_imports_a_sibling_puts_its_folder_on_the_path_first():
    missing = []
    for path in sorted(BENCH.glob("*.py")):
        if path.stem == "conftest" or path.stem.startswith("test_"):
            continue  # pytest's rootdir conftest puts bench/ on the path for these
        tree = ast.parse(path.read_text())
        uses = sibling_imports(tree)
        inserts = [n.lineno for n in tree.body if isinstance(n, ast.Expr) and ast.unparse(n) == INSERT]
        if uses and not (inserts and inserts[0] < min(uses)):
            missing.append(f"{path.name} (sibling import at line {min(uses)})")
    assert not missing, "no module-level " + INSERT + " before: " + ", ".join(missing)


def test_a_script_runs_under_pythonsafepath():
    env = dict(os.environ, PYTHONSAFEPATH="1")
    done = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--help"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
