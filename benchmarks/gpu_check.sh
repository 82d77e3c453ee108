#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU (<= 8 minutes on an H200):
#   1. the CUDA-marked tests;
#   2. fused vs one-model training on CUDA at bf16 tolerance;
#   3. one epoch of the images-paper grid (SI ResNet-18 w32, 25 PLRs, CIFAR-10) fused vs one model,
#      and the estimate of the whole images-paper run.
# Without a GPU it runs its CPU parts (the fused engine's CPU agreement tests and a quick CPU
# throughput comparison) and says that the GPU part was skipped.
#   bash benchmarks/gpu_check.sh [CIFAR-10 source]   # default: the official archive, else ../shared/data's JPEGs
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATA=${1:-}
if [ -z "$DATA" ]; then
  if [ -n "${LRFEATURES_DATA:-}" ] && ls "$LRFEATURES_DATA"/cifar-10-python.tar.gz >/dev/null 2>&1; then DATA=cifar10
  elif [ -f ../shared/data/cifar10-jpeg.tar.gz ]; then DATA=../shared/data/cifar10-jpeg.tar.gz
  elif [ -f shared/data/cifar10-jpeg.tar.gz ]; then DATA=shared/data/cifar10-jpeg.tar.gz
  else DATA=cifar10; fi
fi
status=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
  echo "== 1. CUDA-marked tests"
  timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider || status=1
  echo "== 2-3. fused vs one model on CUDA, images-paper epoch and estimate (data: $DATA)"
  timeout 360 "$PY" benchmarks/gpu_check.py --data "$DATA" || status=1
else
  echo "GPU part SKIPPED: no CUDA device (torch.cuda.is_available() is False). Running the CPU parts."
  echo "== CPU: fused engine agreement (float64) and divergence/chunking tests"
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused.py -m "not slow" || status=1
  echo "== CPU: quick fused vs one-model throughput"
  timeout 300 "$PY" benchmarks/image_grid_throughput.py --quick --threads 1 --steps 2 --repeats 1 || status=1
  echo "gpu=skipped"
fi
exit $status
