# gpu-check-limit: 75
# Where the triton loss backend's fwd+bwd time goes (benchmarks/profile_loss.py): each phase
# against the cuBLAS GEMM of the same size, for B = 16384 and 65536 at D = 512 and D = 256..1024
# at B = 16384 (bf16), and fp32 at B = 16384. About 40-70 s, most of it autotuning (the
# compiled kernels are cached from the loss step; new widths re-tune, fp32 compiles afresh).
set -euo pipefail
${PY:-python3} benchmarks/profile_loss.py --out "$RESULTS" ${GPU_LOSS_PHASES_ARGS:-}
