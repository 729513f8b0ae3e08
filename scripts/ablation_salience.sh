#!/usr/bin/env bash
# Salience ablation: none / offline / e2e with the same backbone, budget and seed on the
# demo phantoms, each tested on the test split, then one comparison table.
#
#   bash scripts/ablation_salience.sh                 # CPU: 400 iterations each (~4 min a run on 2 cores)
#   ITERS=20000 BACKBONE=unet MODEL_KW='{}' bash scripts/ablation_salience.sh   # a GPU box
#
# Environment: ITERS (default 400), BACKBONE (default unet), MODEL_KW (default 16 base
# channels), SEED (0), DATASET (phantom: prepared by prepare_phantom.sh; any prepared
# dataset works), DEMO_DATA / DEMO_CKPT (data and checkpoint roots).
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
# a taken record name fails now, not after the training
[ -z "${RECORD:-}" ] || ${PY:-.venv/bin/python} -m utils.records "$RECORD"
BACKBONE=${BACKBONE:-unet}
MODEL_KW=${MODEL_KW:-'{"base_channels": 16}'}
source scripts/lib_runs.sh
prepare_data
for MODE in none offline e2e; do
  train_and_test "$BACKBONE" "$MODE" "ablation_${MODE}_it${ITERS}_seed${SEED}"
done
OUT=$CKPT/$DATASET/ablation_salience_${BACKBONE/:/_}_it${ITERS}_seed${SEED}.md
echo
# RECORD=NAME also writes results/NAME.json, the record docs/RESULTS.md renders
$PY scripts/compare_runs.py --out "$OUT" "${RUNS[@]}" ${RECORD:+--record "$RECORD"}
echo "comparison table: $OUT"
