"""Switching cost (paper Table 5); the same as ``etr bench switch``. See etr/switch_cost.py.

    python bench/switch_cost.py [--model DIR] [--expert DIR] [--queries 8] [--new-tokens 128] [--trace t.json]
"""

import sys

from etr.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "switch", *sys.argv[1:]]))
