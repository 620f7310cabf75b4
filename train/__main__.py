"""`accelerate launch -m train CONFIG [key=value ...]` (or torchrun -m train): distributed training."""

import sys

from saeworks.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
