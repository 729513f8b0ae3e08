#!/usr/bin/env bash
# Salience ablation: none / offline / e2e with the same backbone, budget and seed on the
# demo phantoms, each tested on the test split, then one comparison table.
#
#   bash scripts/ablation_salience.sh                 # CPU: 400 iterations each (~5 min a run on 2 cores)
#   ITERS=20000 BACKBONE=unet MODEL_KW='{}' bash scripts/ablation_salience.sh   # a GPU box
#
# Environment: ITERS (default 400), BACKBONE (default unet), MODEL_KW (default 16 base
# channels), SEED (0), DATASET (phantom: prepared by prepare_phantom.sh; any prepared
# dataset works), DEMO_DATA / DEMO_CKPT (data and checkpoint roots).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DEMO_DATA:-data}
CKPT=${DEMO_CKPT:-checkpoint}
DATASET=${DATASET:-phantom}
ITERS=${ITERS:-400}
BACKBONE=${BACKBONE:-unet}
MODEL_KW=${MODEL_KW:-'{"base_channels": 16}'}
SEED=${SEED:-0}
HEAD=$CKPT/salience/$DATASET/bank_fit.pth
OUT=$CKPT/$DATASET/ablation_salience_${BACKBONE/:/_}_it${ITERS}_seed${SEED}.md

[ "$DATASET" = phantom ] && bash scripts/prepare_phantom.sh
SIZE_ARGS=(--img_size 192 192)
case "$BACKBONE" in unet3d|monai:*) SIZE_ARGS=(--patch_size 64 64 32) ;; esac

runs=()
for MODE in none offline e2e; do
  echo; echo "== salience $MODE: train $BACKBONE for $ITERS iterations, then test"
  EXTRA=()
  # e2e starts from the same fitted head the offline maps came from
  [ "$MODE" = e2e ] && [ -f "$HEAD" ] && EXTRA=(--head "$HEAD")
  ARGS=(--dataset "$DATASET" --root_path "$DATA" --output_root "$CKPT" --backbone "$BACKBONE"
        --salience $MODE --model_kwargs "$MODEL_KW" "${SIZE_ARGS[@]}" --batch_size 4 --optimizer adamw
        --base_lr 0.003 --loss bce+dice --max_epochs 100 --max_iterations "$ITERS" --val_every 200
        --seed "$SEED" --deterministic 1 --exp "ablation_${MODE}_it${ITERS}_seed${SEED}" "${EXTRA[@]}")
  RUN_DIR=$($PY main.py "${ARGS[@]}" --print_run_dir)
  if [ -f "$RUN_DIR/best_model.pth" ] && [ -f "$RUN_DIR/eval_test/summary.json" ]; then
    echo "reusing $RUN_DIR"
  else
    $PY main.py "${ARGS[@]}" --overwrite
    $PY test.py --dataset "$DATASET" --root_path "$DATA" --backbone "$BACKBONE" \
        --model_path "$RUN_DIR/best_model.pth" --eval_roi liver --output "$RUN_DIR/eval_test" --overwrite
  fi
  runs+=("$MODE=$RUN_DIR/eval_test")
done
echo
$PY scripts/compare_runs.py --out "$OUT" "${runs[@]}"
echo "comparison table: $OUT"
