#!/usr/bin/env bash
# Train a two-tree model (portal vein and hepatic veins, issue 26) and score it per tree:
#
#   bash scripts/train_trees.sh                 # phantoms; tested on the phantom test cases and
#                                               # every real patient under REAL_SRC
#   MIX_REAL=1 bash scripts/train_trees.sh      # phantoms + every real patient under REAL_SRC
#   BACKBONE=unet3d bash scripts/train_trees.sh # 3-D patches (more context across slices)
#
# Ends with "model: <path to best_model.pth>" (predict.py writes <case>_trees.nii.gz with it).
# The CPU defaults are small: within them no model has told the trees apart yet (docs/RESULTS.md,
# "Two trees"); this script is the one command for a longer or GPU run, which scales by itself.
#
# Steps, each through the project's commands (complete stages are reused):
#   1-3. scripts/prepare_trees.sh: the make-demo phantoms and the real patients under REAL_SRC,
#      preprocessed with class maps, and their salience maps.
#   4. MIX_REAL=1: scripts/mix_datasets.py, every real patient's slices + PHANTOM_RATIO times as
#      many phantom slices; else the phantoms alone.
#   5. main.py --classes portal,hepatic (one sigmoid output per tree), no rotations or flips
#      (they would move the hilum and the vena cava, which tell the trees apart), last weights.
#   6. test.py per tree and for the union, inside the liver: the phantom test cases, and the real
#      patients when they were not trained on.
#
# Environment: TREES_DATA (data/trees), TREES_CKPT (checkpoint/trees), REAL_SRC (default
# ../shared/real where it exists; empty: none), MIX_REAL (0), PHANTOM_RATIO (1), BACKBONE (unet |
# unet3d; default unet), ITERS (1200 on a CPU, 10000 with CUDA), BATCH (4; 16 with CUDA for 2-D),
# WIDTH (base channels: 16; 32 with CUDA), PATCH (3-D: "64 64 32"; "96 96 64" with CUDA),
# SEED (0), PY (.venv/bin/python).
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RATIO=${PHANTOM_RATIO:-1}
BACKBONE=${BACKBONE:-unet}
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
# 2 or 3 from the registry: a name test took unet3d_bilinear for a 2-D backbone
DIMS=$($PY -c "import sys; from networks.registry import spatial_dims_of; print(spatial_dims_of(sys.argv[1]))" "$BACKBONE")
ITERS=${ITERS:-$([ "$CUDA" = 1 ] && echo 10000 || echo 1200)}
BATCH=${BATCH:-$([ "$CUDA" = 1 ] && [ "$DIMS" = 2 ] && echo 16 || echo 4)}
WIDTH=${WIDTH:-$([ "$CUDA" = 1 ] && echo 32 || echo 16)}
PATCH=${PATCH:-$([ "$CUDA" = 1 ] && echo "96 96 64" || echo "64 64 32")}
SEED=${SEED:-0}
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*" >&2; }

source scripts/prepare_trees.sh  # steps 1-3; sets REAL_SRC, DATA, CKPT, MIX, PH, REAL, HAVE_REAL

if [ "$MIX" = 1 ]; then
  [ "$HAVE_REAL" = 1 ] || { echo "error: MIX_REAL=1 needs real patients under REAL_SRC" >&2; exit 2; }
  # the mixed folder lists the phantoms' slices, not their volumes, which 3-D patches are cut from
  [ "$DIMS" = 2 ] || { echo "error: MIX_REAL=1 mixes 2-D slices; use a 2-D backbone" >&2; exit 2; }
  step "4/6 mix: every real patient + $RATIO x as many phantom slices"
  LISTS=$DATA/lists/train_all/$REAL
  mkdir -p "$LISTS"
  cp "$DATA/lists/all/$REAL/vol_train.txt" "$LISTS/vol_train.txt"
  cp "$DATA/lists/all/$REAL/vol_train.txt" "$LISTS/vol_val.txt"  # read once, at the end
  : > "$LISTS/vol_test.txt"
  rm -rf "$DATA/mix" "$DATA/lists/mix"
  $PY scripts/mix_datasets.py --real_root "$DATA/$REAL" --real_list_dir "$LISTS" \
      --real_slices "$DATA/lists/all/$REAL/slice_train.txt" --phantom_root "$DATA/$PH" \
      --phantom_list_dir "$DATA/lists/$PH" --phantom_ratio "$RATIO" --out "$DATA/mix/$REAL" \
      --out_list_dir "$DATA/lists/mix/$REAL" >&2
  TRAIN=(--dataset $REAL --root_path "$DATA/mix" --list_dir "$DATA/lists/mix")
  TAG=mix_r$RATIO
else
  step "4/6 phantoms only"
  TRAIN=(--dataset $PH --root_path "$DATA" --list_dir "$DATA/lists")
  TAG=phantoms
fi

step "5/6 train: $BACKBONE ($WIDTH channels), --classes portal,hepatic, $ITERS iterations"
SHAPE=(--target_spacing 0.9 --img_size 192 192)
[ "$DIMS" = 3 ] && read -r -a P <<< "$PATCH" && SHAPE=(--patch_size "${P[@]}")
ARGS=("${TRAIN[@]}" --output_root "$CKPT" --backbone "$BACKBONE" --model_kwargs "{\"base_channels\": $WIDTH}"
      --salience offline --classes portal,hepatic "${SHAPE[@]}" --batch_size "$BATCH" --optimizer adamw
      --base_lr 0.003 --loss bce+dice --max_epochs 10000 --max_iterations "$ITERS" --val_every "$ITERS"
      --augment 0 --domain_aug 1 --min_component_mm3 20 --seed "$SEED"
      --exp "trees_${TAG}_${BACKBONE}_w${WIDTH}_it${ITERS}_s${SEED}")
RUN=$($PY main.py "${ARGS[@]}" --print_run_dir)
$PY main.py "${ARGS[@]}" --reuse >&2

step "6/6 test.py per tree, inside the liver"
$PY test.py --dataset $PH --root_path "$DATA" --list_dir "$DATA/lists" --backbone "$BACKBONE" \
    --model_path "$RUN/best_model.pth" --eval_roi liver --output "$RUN/eval_phantom_test" >&2
if [ "$HAVE_REAL" = 1 ] && [ "$MIX" != 1 ]; then
  $PY test.py --dataset $REAL --root_path "$DATA" --list_dir "$DATA/lists/test_real" --backbone "$BACKBONE" \
      --model_path "$RUN/best_model.pth" --eval_roi liver --output "$RUN/eval_real" >&2
fi
echo "model: $RUN/best_model.pth"
