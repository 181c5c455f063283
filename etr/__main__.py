import sys

from etr.cli import main

sys.exit(main())
