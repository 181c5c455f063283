import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks import their sibling scripts' helpers
