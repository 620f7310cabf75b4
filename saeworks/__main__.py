"""`python -m saeworks ...`: the same as the `saeworks` console command."""

import sys

from saeworks.cli import main

if __name__ == "__main__":
    sys.exit(main())
