"""`accelerate launch -m activations CONFIG [key=value ...]` (or torchrun -m): a distributed harvest."""

import sys

from saeworks.cli import main

if __name__ == "__main__":
    sys.exit(main(["harvest", *sys.argv[1:]]))
