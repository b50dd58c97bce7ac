#!/usr/bin/env bash
# The test command: set up (including the CUDA kernels' compilation when nvcc is present), then
# run the whole suite. Triton kernels run in the CPU interpreter where there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export FORCE_CUDA=${FORCE_CUDA:-1}
fi
bash scripts/setup.sh test,dali
# shellcheck disable=SC1091
source .venv/bin/activate
python -c "import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)" \
  || export TRITON_INTERPRET=1
exec python -m pytest -q tests "$@"
