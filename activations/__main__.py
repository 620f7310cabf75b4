"""`accelerate launch -m saeworks.activations CONFIG [key=value ...]` (or torchrun -m): a harvest.

An entry point of the application layer: it runs the CLI, so it may import it (tests/test_layering.py).
"""

import sys

from saeworks.cli import main

if __name__ == "__main__":
    sys.exit(main(["harvest", *sys.argv[1:]]))
