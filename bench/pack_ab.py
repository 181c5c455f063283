"""Packed K pages against the row layout in whole engine decode steps, interleaved in one process:
``bench/knob_ab.py --knob pack_k`` under its earlier name (bench/RESULTS.md quotes this command).

    python bench/pack_ab.py [--model DIR] [--points 16x128 16x2048 16x4096 1x4096] [--rounds 8] [--steps 4]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import knob_ab  # noqa: E402
from knob_ab import set_layout  # noqa: E402, F401 (tests/test_pack_ab_bench.py switches layouts with it)


def main(argv=None) -> int:
    return knob_ab.main(["--knob", "pack_k", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
