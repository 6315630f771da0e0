#!/usr/bin/env bash
# Create .venv (once) and install the project's requirements into it.
# Idempotent: a second run installs nothing new. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # The CPU build; a GPU user can install their CUDA build of torch into .venv instead.
    echo "setup: installing torch 2.13.0"
    "${PIP[@]}" "torch==2.13.0"
fi
echo "setup: installing the toolkit (pip install -e .) with its requirements and the dev tools"
"${PIP[@]}" -e ".[dev]"
.venv/bin/python -c "import torch, transformers; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}')"
