#!/usr/bin/env bash
# The main command: set up, then run the demo on its embedded default (synthetic phantoms):
# train region-aware RegionMed-CLIP and the global-only baseline with the same budget, evaluate
# both on a held-out split and write a report. Extra arguments go to `regionmed-fast demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,dali
# shellcheck disable=SC1091
source .venv/bin/activate
exec regionmed-fast demo "$@"
