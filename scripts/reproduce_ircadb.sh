#!/usr/bin/env bash
# The seed protocol on real 3D-IRCADb, for a GPU box: preprocess -> fit the salience head
# on the training split -> three-plane salience -> train the seed's U-Net (100 epochs,
# img_size 256, batch 4, SGD lr 0.01, poly 0.9, BCE, best by val Dice) -> test.
#
#   bash scripts/reproduce_ircadb.sh /path/to/3Dircadb1      # holds 3Dircadb1.1 ... 3Dircadb1.20
#
# Environment: GENERATOR (bank | fpn | analytic; default bank), FPN_WEIGHTS (the authors'
# dice_best_Wavelet_square_net_vessel_data_size512.pth, for GENERATOR=fpn), SALIENCE
# (offline | e2e | none; default offline: e2e starts from the fitted bank head, so it needs
# GENERATOR=bank; none makes no maps), BACKBONE (unet), NPROC (GPUs for torchrun; default 1),
# FIT_ITERS (head fitting iterations, default 2000), EPOCHS (100), MAX_ITERS (unset: the epochs
# decide; a small number makes a dry run, e.g. on a CPU before renting a GPU), MODEL_KW (JSON
# backbone arguments), DATA (data), CKPT (checkpoint). A dry run's head and run folder are named by
# its FIT_ITERS, EPOCHS and MAX_ITERS, so the real run after it neither reuses nor resumes them.
# Splits: list/3D-IRCADb/vol_{train,val,test}.txt (the authors' seed split): every patient they
# name (all 20) must be under the source folder.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
SRC=${1:?usage: reproduce_ircadb.sh /path/to/3Dircadb1}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data}
CKPT=${CKPT:-checkpoint}
GENERATOR=${GENERATOR:-bank}
SALIENCE=${SALIENCE:-offline}
BACKBONE=${BACKBONE:-unet}
NPROC=${NPROC:-1}
FIT_ITERS=${FIT_ITERS:-2000}
EPOCHS=${EPOCHS:-100}
MAX_ITERS=${MAX_ITERS:-}
MODEL_KW=${MODEL_KW:-}
DS=3D-IRCADb
LISTS=list/$DS  # the seed split
step() { echo; echo "== $*"; }
case "$SALIENCE" in
  offline) TAG=${SALIENCE}_${GENERATOR} ;;
  e2e) [ "$GENERATOR" = bank ] || { echo "error: SALIENCE=e2e learns the bank head: use GENERATOR=bank" >&2; exit 2; }
       TAG=e2e_bank ;;
  none) TAG=none ;;
  *) echo "error: SALIENCE must be offline, e2e or none" >&2; exit 2 ;;
esac

step "1/5 preprocess $SRC -> $DATA/$DS (portal vein + venous system; liver slices)"
$PY preprocess.py --dataset $DS --src "$SRC" --root_path "$DATA" --workers 4
# every case of the seed split, or stop here (later steps would fail on the first missing one)
MISSING=$($PY -c "import sys
from utils.h5io import DatasetPaths, read_list
p = DatasetPaths.of(sys.argv[1], sys.argv[2], sys.argv[3])
print(' '.join(c for s in ('train', 'val', 'test') for c in read_list(p.list_file('vol_' + s))
               if not p.volume(c).is_file()))" "$DATA" "$DS" list)
if [ -n "$MISSING" ]; then
  echo "error: $DATA/$DS lacks listed case(s) $MISSING: the seed split needs all 20 patients of 3D-IRCADb1 in $SRC" >&2
  exit 1
fi

if [ "$SALIENCE" != none ]; then
  step "2/5 salience generator: $GENERATOR"
  # NORMALISATION: volume (default here) is the paper's salience rule; fixed makes a scan's maps
  # independent of how far it extends (docs/DESIGN.md section 1a), for models meant for predict.py
  NORMALISATION=${NORMALISATION:-volume}
  GEN_ARGS=(--dataset $DS --root_path "$DATA" --generator "$GENERATOR" --normalisation "$NORMALISATION")
  case "$GENERATOR" in
    bank)
      # one fitted head per rule and fitting length: a dry run's short fit is not the real run's head
      HEAD_DIR=$CKPT/salience/$NORMALISATION
      [ "$FIT_ITERS" = 2000 ] || HEAD_DIR+=/fit$FIT_ITERS
      HEAD=$HEAD_DIR/$DS/bank_fit.pth
      if [ ! -f "$HEAD" ]; then
        $PY salience_generation.py "${GEN_ARGS[@]}" --fit --fit_only --iters "$FIT_ITERS" --seed 0 \
            --checkpoint_dir "$HEAD_DIR"
      else
        echo "the head fitted with $FIT_ITERS iterations is there: $HEAD"
      fi
      GEN_ARGS+=(--weights "$HEAD") ;;
    fpn) GEN_ARGS+=(--weights "${FPN_WEIGHTS:?set FPN_WEIGHTS to the authors weights file}") ;;
    analytic) ;;
    *) echo "GENERATOR must be bank, fpn or analytic" >&2; exit 2 ;;
  esac

  step "3/5 three-plane salience for every case"
  $PY salience_generation.py "${GEN_ARGS[@]}"
else
  step "2-3/5 no salience maps (SALIENCE=none)"
fi

step "4/5 train $BACKBONE (salience $SALIENCE), seed defaults, $NPROC GPU(s)"
# the run folder names a shortened run, so the real one neither resumes nor reuses it
EXP=seed_${TAG}
[ "$EPOCHS" = 100 ] || EXP+=_e$EPOCHS
[ -z "$MAX_ITERS" ] || EXP+=_it$MAX_ITERS
[ "$GENERATOR" != bank ] || [ "$SALIENCE" = none ] || [ "$FIT_ITERS" = 2000 ] || EXP+=_fit$FIT_ITERS
TRAIN_ARGS=(--dataset $DS --root_path "$DATA" --output_root "$CKPT" --backbone "$BACKBONE"
            --salience "$SALIENCE" --max_epochs "$EPOCHS" --batch_size 4 --base_lr 0.01 --img_size 256 256
            --seed 0 --exp "$EXP")
[ -z "$MAX_ITERS" ] || TRAIN_ARGS+=(--max_iterations "$MAX_ITERS")
[ -z "$MODEL_KW" ] || TRAIN_ARGS+=(--model_kwargs "$MODEL_KW")
# e2e starts from the head fitted in step 2 (without --head, from an untrained one)
if [ "$SALIENCE" = e2e ]; then TRAIN_ARGS+=(--head "$HEAD"); fi
RUN_DIR=$($PY main.py "${TRAIN_ARGS[@]}" --print_run_dir)
if [ -f "$RUN_DIR/last.pth" ]; then TRAIN_ARGS+=(--resume); fi
if [ "$NPROC" -gt 1 ]; then
  $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" main.py "${TRAIN_ARGS[@]}"
else
  $PY main.py "${TRAIN_ARGS[@]}"
fi

step "5/5 test on the seed's test cases ($(tr '\n' ' ' < "$LISTS/vol_test.txt" | sed 's/ *$//'))"
$PY test.py --dataset $DS --root_path "$DATA" --backbone "$BACKBONE" --model_path "$RUN_DIR/best_model.pth" \
    --eval_roi liver --figures --save_pred nifti --output "$RUN_DIR/eval_test"
echo "results table: $RUN_DIR/eval_test/results.md"
