#!/usr/bin/env bash
# GPU benchmark, one command on a fresh GPU box with the repository's requirements installed
# (sized to take minutes on one GPU, not yet timed on one; nothing is downloaded):
#   1. makes its own phantom data (4 demo-preset and 2 full-preset patients, analytic salience
#      on the GPU) under $BENCH_DATA (default: a temporary folder, removed at the end);
#   2. prints the trainer-vs-in-memory table of bench/train_bench.py for the seed's settings:
#      unet base 64, AMP, --cache_data 1, 8 loader workers; 256 x 256 at batch 4 and 8 on the
#      demo preset (short epochs), 512 x 512 at batch 8 on the full preset (long epochs);
#      offline and none salience, e2e beside;
#   3. prints the e2e salience speed (bench/e2e_salience_bench.py, CUDA with AMP).
#
#   bash scripts/gpu_bench.sh                 # from anywhere; PY=python3 by default
#   BENCH_REPEATS=3 BENCH_ITERS=60 bash scripts/gpu_bench.sh
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ "$PY" = python3 ] && PY=.venv/bin/python
REPEATS=${BENCH_REPEATS:-2}
ITERS=${BENCH_ITERS:-40}
WORKERS=${BENCH_WORKERS:-8}
if [ -n "${BENCH_DATA:-}" ]; then
  DATA=$BENCH_DATA
else
  DATA=$(mktemp -d)
  trap 'rm -rf "$DATA"' EXIT
fi
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

step "environment"
$PY - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_bench.sh: no CUDA device (bench/train_bench.py --device cpu measures the CPU)")
print("torch", torch.__version__, "|", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported())
PY
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader 2>/dev/null || true

COMMON=(--device cuda --amp 1 --base 64 --workers "$WORKERS" --cache_data 1 --iters "$ITERS" --repeats "$REPEATS"
        --data "$DATA")
step "trainer vs in-memory: 256 x 256, batch 4 and 8, demo preset (short epochs)"
$PY bench/train_bench.py "${COMMON[@]}" --presets demo --sizes 256 --batch 4 8 --salience offline none e2e
step "trainer vs in-memory: 512 x 512, batch 8, full preset (long epochs)"
$PY bench/train_bench.py "${COMMON[@]}" --presets full --sizes 512 --batch 8 --salience offline none e2e

step "e2e salience speed (SalienceModule vs the authors' module), CUDA, AMP"
if [ -f bench/e2e_salience_bench.py ]; then
  $PY bench/e2e_salience_bench.py --device cuda --amp
else
  echo "bench/e2e_salience_bench.py not found in this checkout: skipped"
fi
step "done"
