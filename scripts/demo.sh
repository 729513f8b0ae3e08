#!/usr/bin/env bash
# make demo: the whole pipeline on phantom patients, on the CPU, in under 10 minutes
# (2 cores): phantoms -> HDF5 -> salience head fit + three-plane salience -> U-Net with
# offline salience -> test.py. A second run reuses every stage that is complete.
#
# Knobs (environment): DEMO_ITERS (training iterations, default 900), DEMO_FIT_ITERS
# (head fine-tuning iterations, default 60), DEMO_DATA (default data), DEMO_CKPT (default checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DEMO_DATA:-data}
CKPT=${DEMO_CKPT:-checkpoint}
RAW=$DATA/raw/phantom
DATASET=phantom
ITERS=${DEMO_ITERS:-900}
FIT_ITERS=${DEMO_FIT_ITERS:-60}
HEAD=$CKPT/salience/$DATASET/bank_fit.pth
# small U-Net: the seed's 64 base channels take ~10x longer per step on a CPU
MODEL_KW='{"base_channels": 16}'
T0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - T0 )) s] $*"; }

step "1/5 phantom patients -> $RAW"
if [ -f "$RAW/phantom_manifest.json" ]; then
  echo "reusing $RAW (delete it to make new patients)"
else
  $PY make_phantoms.py --out "$RAW" --cases 12 --preset demo --seed 0 --workers 2 --overwrite
fi

step "2/5 preprocess -> $DATA/$DATASET (complete cases are skipped)"
$PY preprocess.py --dataset $DATASET --src "$RAW" --root_path "$DATA" --workers 2

step "3/5 salience: fine-tune the shipped bank head on the training split, then three-plane maps"
if [ -f "$HEAD" ]; then
  echo "reusing fitted head $HEAD"
else
  $PY salience_generation.py --dataset $DATASET --root_path "$DATA" --fit --fit_only \
      --weights pretrained/bank_head_phantom.pth --iters "$FIT_ITERS" --seed 0 \
      --checkpoint_dir "$CKPT/salience"
fi
$PY salience_generation.py --dataset $DATASET --root_path "$DATA" --generator bank --weights "$HEAD"

step "4/5 train unet with offline salience ($ITERS iterations)"
RUN_ARGS=(--dataset $DATASET --root_path "$DATA" --output_root "$CKPT" --backbone unet --salience offline
          --model_kwargs "$MODEL_KW" --img_size 192 192 --batch_size 4 --optimizer adamw --base_lr 0.003
          --loss bce+dice --max_epochs 100 --max_iterations "$ITERS" --val_every 300 --seed 0 --exp demo)
RUN_DIR=$($PY main.py "${RUN_ARGS[@]}" --print_run_dir)
if [ -f "$RUN_DIR/best_model.pth" ]; then
  echo "reusing trained model in $RUN_DIR"
else
  $PY main.py "${RUN_ARGS[@]}" --overwrite
fi

step "5/5 test.py on the test phantoms"
$PY test.py --dataset $DATASET --root_path "$DATA" --backbone unet --model_path "$RUN_DIR/best_model.pth" \
    --eval_roi liver --figures --output "$RUN_DIR/eval_test" --overwrite
echo
echo "demo done in $(( $(date +%s) - T0 )) s"
echo "results table: $RUN_DIR/eval_test/results.md; figures: $RUN_DIR/eval_test/figures/"
