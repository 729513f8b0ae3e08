#!/usr/bin/env bash
# Stages 1-3 on phantom patients, shared by demo.sh and the ablation scripts:
# 12 demo phantoms -> HDF5 (8 train / 2 val / 2 test) -> bank head fine-tuned on the
# training split -> three-plane salience for every case. Complete stages are reused.
#
# Environment: DEMO_DATA (default data), DEMO_CKPT (default checkpoint),
# DEMO_FIT_ITERS (head fine-tuning iterations, default 60), DEMO_NORMALISATION (salience
# normalisation rule, salience_generation.py --normalisation, default fixed), PY (default .venv/bin/python).
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DEMO_DATA:-data}
CKPT=${DEMO_CKPT:-checkpoint}
RAW=$DATA/raw/phantom
DATASET=phantom
FIT_ITERS=${DEMO_FIT_ITERS:-60}
NORM=${DEMO_NORMALISATION:-fixed}
# one fitted head per rule: the head learns on planes standardised by it
HEAD_DIR=$CKPT/salience/$([ "$NORM" = volume ] && echo "" || echo "$NORM")
HEAD=$HEAD_DIR/$DATASET/bank_fit.pth
T0=${T0:-$(date +%s)}
step() { echo; echo "== [$(( $(date +%s) - T0 )) s] $*"; }

step "1/5 phantom patients -> $RAW"
if [ -f "$RAW/phantom_manifest.json" ]; then
  if ! $PY -c "import sys; from phantom.generator import manifest_is_current; sys.exit(not manifest_is_current(sys.argv[1]))" "$RAW"; then
    echo "error: $RAW was made by another version of the phantom generator (phantom/*.py changed since)." >&2
    echo "       Everything made from it is stale: delete $RAW, $DATA/$DATASET, $CKPT/salience[/fixed]/$DATASET and the" >&2
    echo "       runs under $CKPT/$DATASET and $CKPT/s2r you do not want to keep, or set DEMO_DATA and DEMO_CKPT to" >&2
    echo "       new folders." >&2
    exit 2
  fi
  echo "reusing $RAW (delete it to make new patients)"
else
  # new patients: HDF5 volumes, fitted head and salience made from earlier ones would be
  # reused by the complete-stage checks below without this
  for old in "$DATA/$DATASET" "$CKPT/salience/$DATASET" "$CKPT/salience/fixed/$DATASET"; do
    if [ -e "$old" ]; then echo "removing $old (made from other phantom patients)"; rm -rf "$old"; fi
  done
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
      --checkpoint_dir "$HEAD_DIR" --normalisation "$NORM"
fi
$PY salience_generation.py --dataset $DATASET --root_path "$DATA" --generator bank --weights "$HEAD" \
    --normalisation "$NORM"
