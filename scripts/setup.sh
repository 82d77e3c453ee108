#!/usr/bin/env bash
# Create .venv and install lrfeatures with its test extras.
# The CPU build of torch is installed first so that pip never pulls a multi-GB CUDA build.
# GPU users: install your CUDA torch into the venv first, then run with LRF_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "${LRF_KEEP_TORCH:-0}" != "1" ] && ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test,ray]"
