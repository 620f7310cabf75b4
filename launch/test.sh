#!/usr/bin/env bash
# The test command: lint, type check, then every test (slow and distributed ones included).
# Hardware: any CPU (2 cores suffice). Time: ~13-16 min on 2 cores (pytest 11-14 min, 804 tests; mypy ~1 min); the
#   first run also prepares the embedded model (~20 s) and corpus (~10 s) in the saeworks cache and
#   builds the native kernels with the C compiler (under a second each; without one, torch ops).
# Run:  bash launch/test.sh            (extra arguments go to pytest, e.g. -m "not slow")
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check .
mypy
python -m pytest -q "$@"
