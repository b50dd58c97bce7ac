#!/usr/bin/env bash
# Puts the results of a GPU check (the results.tgz that benchmarks/gpu_check.sh leaves under
# $OUT) into benchmarks/results/ and renders the README's performance tables from them:
#   bash scripts/unpack_gpu_results.sh PATH/TO/results.tgz
# The logs stay out (they are in the archive); the run's history rows are appended to
# benchmarks/results/history.csv rather than replacing it.
set -euo pipefail
tgz=$(realpath "${1:?usage: unpack_gpu_results.sh results.tgz}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
tar xzf "$tgz" --strip-components=1 -C benchmarks/results --exclude='results/logs*' --exclude='results/history.csv'
if tar tzf "$tgz" results/history.csv >/dev/null 2>&1; then
  tar xzf "$tgz" -O results/history.csv | tail -n +2 >>benchmarks/results/history.csv
fi
tar tzf "$tgz" | grep -v -e '/logs' -e 'history.csv' -e '/$' | sed 's|^results/|benchmarks/results/|'
"$PY" benchmarks/run_all.py --readme-only
