#!/usr/bin/env bash
# The GPU machines' Python stack on this CPU machine, to catch what their versions break before a GPU is lent:
# Python 3.12, torch 2.11.0, Triton 3.6.0, transformers 5.17.0, safetensors 0.8.0 (the device tool's KINDS.md,
# as read 2026-11). Like the device, it gets the checkout as source and installs nothing of the project.
# Runs: the GPU suite's smoke run (imports from source), the sm_90 compile check with Triton 3.6's ptxas, and
# the whole test suite. About 5 GB of downloads the first time (PyPI's torch 2.11 is a CUDA build).
#   bash bench/gpu_mirror.sh [VENV]      (default .venv-gpu-mirror)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-gpu-mirror}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3.12 -m venv "$VENV"
  # numpy < 2.4: Triton 3.6's interpreter converts 1-element arrays to scalars, which numpy 2.5 refuses
  # (the device never interprets kernels, so its numpy 2.5 does not matter there).
  "$PY" -m pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 safetensors==0.8.0 accelerate==1.15.0 \
    'numpy<2.4' tqdm pytest pytest-benchmark matplotlib
fi
"$PY" -c "import torch, triton, transformers; print('mirror:', torch.__version__, triton.__version__, transformers.__version__)"
OUT_DIR="$(mktemp -d)"
"$PY" "$ROOT/bench/gpu_suite.py" --smoke --out "$OUT_DIR/gpu_suite.json" | tail -16
TREE="$(mktemp -d)"
"$PY" -c "import sys, pathlib; sys.path.insert(0, '$ROOT/bench'); import suite_process; suite_process.source_tree(pathlib.Path('$TREE'))"
cd "$TREE"  # not the checkout's root, whose etr/ (the facade alone) would shadow the tree
PYTHONPATH="$TREE" "$PY" -m pytest -q --rootdir "$ROOT" "$ROOT/tests"
