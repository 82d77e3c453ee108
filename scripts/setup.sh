#!/usr/bin/env bash
# Create .venv and install lrfeatures with its test extras (bash scripts/setup.sh [--cuda]).
#
# torch is installed first, so that pip never pulls a build the machine cannot use:
#   no NVIDIA driver (no nvidia-smi, no /proc/driver/nvidia)
#                      the CPU build, from the PyTorch CPU wheel index when it answers within a few
#                      seconds, else from the default index (pip's configuration, e.g. a mirror)
#   an NVIDIA driver   torch from the default index (on Linux, PyPI's torch is the CUDA 12 build)
#   LRF_TORCH=cu124    the CUDA build of that index (https://download.pytorch.org/whl/cu124; any cuXYZ)
#   --cuda             the same as LRF_TORCH=cu124
#   LRF_TORCH=cpu      the CPU build, with or without a driver
#   LRF_KEEP_TORCH=1   keep the torch already in .venv (e.g. one you built); so does any importable torch
# LRF_TORCH_SPEC (default torch==2.13.0) is the requirement installed; LRF_TORCH_INDEX_BASE
# (default https://download.pytorch.org/whl) the base of the PyTorch indexes. LRF_SETUP_PLAN=1
# prints the torch install command chosen (one line, "torch: ...") and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${LRF_TORCH_SPEC:-torch==2.13.0}
INDEX_BASE=${LRF_TORCH_INDEX_BASE:-https://download.pytorch.org/whl}
NVIDIA_PROC=${LRF_NVIDIA_PROC:-/proc/driver/nvidia}   # overridable for the set-up's tests
VARIANT=${LRF_TORCH:-}
for arg in "$@"; do
  case "$arg" in
    --cuda) VARIANT=${VARIANT:-cu124} ;;
    *) echo "setup.sh: unknown argument $arg; use --cuda or none (see the comments at the top)" >&2; exit 2 ;;
  esac
done
if [ -n "$VARIANT" ] && ! [[ "$VARIANT" =~ ^(cpu|cu[0-9]{3,4}|rocm[0-9.]+)$ ]]; then
  echo "setup.sh: LRF_TORCH=$VARIANT is not a PyTorch build; use cpu, cu124 (or another cuXYZ) or rocmX.Y" >&2
  exit 2
fi

has_nvidia_driver() {
  command -v nvidia-smi >/dev/null 2>&1 || [ -e "$NVIDIA_PROC" ]
}

reachable() {  # whether an index answers within 5 s (a machine without internet must not wait long)
  "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/", timeout=5).close()
EOF
}

torch_install_args() {  # the pip arguments that install torch on this machine (one line)
  if [ -z "$VARIANT" ]; then
    if has_nvidia_driver; then
      echo "$TORCH_SPEC"; return
    fi
    VARIANT=cpu
  fi
  local index="$INDEX_BASE/$VARIANT"
  if reachable "$index"; then
    echo "$TORCH_SPEC --index-url $index"
  elif [ "$VARIANT" = cpu ]; then
    # No PyTorch index here (offline mirror, firewall): the default index; on this project's
    # machines it holds the CPU build.
    echo "$TORCH_SPEC"
  else
    echo "setup.sh: $index cannot be reached; check the network, or install torch yourself and use LRF_KEEP_TORCH=1" >&2
    return 2
  fi
}

if [ "${LRF_SETUP_PLAN:-0}" = "1" ]; then
  args=$(torch_install_args)
  echo "torch: $args"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
PY=python
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "${LRF_KEEP_TORCH:-0}" != "1" ] && ! python -c "import torch" >/dev/null 2>&1; then
  args=$(torch_install_args)
  # shellcheck disable=SC2086  (the arguments are words: a requirement and an optional --index-url URL)
  python -m pip install -q $args
fi
python -m pip install -q -e ".[test,ray]"
