#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with pinned torch, the package (editable) and
# its compiled extension. FORCE_CUDA=1 also compiles the CUDA kernels (nvcc must match torch).
# Usage: bash scripts/setup.sh [extras]   (default extras: test,dali)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-test,dali}
py=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
echo "[setup] pip + pinned torch (torch==2.14.1, torchvision==0.29.1)"
python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q torch==2.14.1 torchvision==0.29.1 pybind11 ninja
# CUDA build variables that torch cannot guess on a machine without a GPU (see ENV-NOTES).
if [[ -d /usr/local/cuda ]]; then export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "[setup] building regionmed-fast (FORCE_CUDA=${FORCE_CUDA:-0}) with extras [$extras]"
python -m pip install -q --no-build-isolation --use-pep517 -e ".[$extras]"
python -m regionmed_fast.info
