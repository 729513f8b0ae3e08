#!/usr/bin/env bash
# Train a tree model (inference/tree_model.py, issue 26): it labels a binary vessel model's mask
# portal vein or hepatic veins, seeing the whole mask and the image at 3 mm per voxel in 3-D.
#
#   bash scripts/train_tree_model.sh              # phantoms (make demo's train + val cases, and more),
#                                                 # then branch networks; tested on the real patients
#   MIX_REAL=1 bash scripts/train_tree_model.sh   # + every real patient under REAL_SRC in the tree model
#
# Ends with "tree model: <path>"; then
#   python predict.py --model VESSELS.pth --tree_model TREE.pth --input SCAN --output OUT --mesh
# writes <case>_trees.nii.gz (1 portal, 2 hepatic), a surface and statistics per tree.
#
# Steps (complete stages are reused):
#   1. scripts/prepare_trees.sh: the make-demo phantoms and the real patients under REAL_SRC,
#      preprocessed with class maps (its steps a-c); and EXTRA_PHANTOMS more phantom patients
#      (seed 200) with class maps.
#   2. train_tree_model.py on the true masks of the phantoms' train and val cases, the extra
#      phantoms and, with MIX_REAL=1, every real patient under REAL_SRC: no vessel model is needed
#      to train it.
#   3. with a vessel model and extra phantoms (BRANCHES=1, the default): branch networks
#      (train_branch_model.py, inference/branch_graph.py) trained on the vessel model's masks of
#      the extra phantoms inside their livers, as test.py and predict.py give them (test.py
#      --eval_roi liver --save_pred h5 --pred_kind mask), written into a second file,
#      tree_model_branches_s<BRANCH_SEEDS>_v<the vessel model's sha256, 12 hex>.pth (another vessel
#      model gets its own file): it decides per branch of the mask's skeleton. In
#      each of four trainings they put fewer found vessels in the wrong tree than the tree model
#      alone on real patients 1 and 7 taken together and on two of three sets of held-out
#      phantoms, and on the third in three of the four (records tree_branches_one_thread,
#      tree_branches, tree_branches_retrained). They train on one torch thread: the same seeds
#      give the same networks.
#   4. test.py with the vessel model and the tree model (with branch networks when trained), per
#      tree and for the union, inside the liver: the phantom test cases, and the real patients not
#      trained on.
#
# Environment: TREES_DATA (data/trees), TREES_CKPT (checkpoint/trees), REAL_SRC (default
# ../shared/real where it exists; empty: none), MIX_REAL (0 when branch networks are trained: with them
# the phantom-only tree model did better on both real patients, record tree_branches_real_mixed;
# otherwise 1 when REAL_SRC holds real patients, record tree_cut_real_mixed), REAL_REPEAT (8: each real patient's
# share of the training steps, as that many cases), EXTRA_PHANTOMS (120: on 10 held-out phantoms
# fewer vessels in the wrong tree than 36; 300 were no better), ITERS (800), GRID_MM (3: as good
# as 2 mm on the phantoms and the real patients, in a fraction of the time),
# SEED (0), VESSEL_MODEL (make demo's model), BRANCHES (1; 0: the tree model alone), BRANCH_SEEDS
# (0-9: one branch network per seed, averaged), PY (.venv/bin/python).
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ITERS=${ITERS:-800}
EXTRA=${EXTRA_PHANTOMS:-120}
REPEAT=${REAL_REPEAT:-8}
GRID_MM=${GRID_MM:-3}
SEED=${SEED:-0}
BRANCHES=${BRANCHES:-1}
BRANCH_SEEDS=${BRANCH_SEEDS:-0-9}
VESSEL_MODEL=${VESSEL_MODEL:-${DEMO_CKPT:-checkpoint}/phantom/unet/epo100_bs4_lr0.003/demo/best_model.pth}
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*" >&2; }

MIX_DEFAULT=${MIX_REAL:-auto}  # unset or empty: the default
source scripts/prepare_trees.sh  # sets REAL_SRC, DATA, CKPT, MIX, PH, REAL, HAVE_REAL
# the branch networks are trained when there is a vessel model to make their masks and there are extra phantoms
WILL_BRANCH=0
if [ "$BRANCHES" = 1 ] && [ -f "$VESSEL_MODEL" ] && [ "$EXTRA" -gt 0 ]; then WILL_BRANCH=1; fi
# by default the real patients join the tree model's training when there are any, unless branch networks follow
# (prepare_trees.sh's MIX is 0 unless set): with them, the phantom-only tree model put fewer found vessels in the
# wrong tree on both real patients (record tree_branches_real_mixed); without them the mixed one did on average
if [ "$MIX_DEFAULT" = auto ]; then
  if [ "$WILL_BRANCH" = 1 ]; then MIX=0; else MIX=$HAVE_REAL; fi
fi

DATA_ARGS=(--data "$DATA" $PH "$DATA/lists")
TAG=phantoms_x$EXTRA
if [ "$EXTRA" -gt 0 ]; then
  XP=phantom_extra$EXTRA
  step "1/4 $EXTRA more phantom patients with class maps -> $DATA/$XP"
  if ! { [ -f "$DATA/raw/$XP/phantom_manifest.json" ] && $PY -c "import sys; from phantom.generator import manifest_is_current
sys.exit(not manifest_is_current(sys.argv[1]))" "$DATA/raw/$XP"; }; then
    rm -rf "$DATA/raw/$XP" "${DATA:?}/$XP"
    $PY make_phantoms.py --out "$DATA/raw/$XP" --cases "$EXTRA" --preset demo --seed 200 --workers 2 --overwrite >&2
  fi
  $PY preprocess.py --dataset $XP --src "$DATA/raw/$XP" --root_path "$DATA" --list_dir "$DATA/lists" \
      --vessel_classes $CLASSES --workers 2 --split 100/0/0 >&2
  DATA_ARGS+=(--data "$DATA" $XP "$DATA/lists")
fi
if [ "$MIX" = 1 ]; then
  [ "$HAVE_REAL" = 1 ] || { echo "error: MIX_REAL=1 needs real patients under REAL_SRC" >&2; exit 2; }
  # each real patient REAL_REPEAT times: among 46 phantoms one patient would be 1 step in 47
  for _ in $(seq "$REPEAT"); do DATA_ARGS+=(--data "$DATA" $REAL "$DATA/lists/all"); done
  TAG=mixed_x${EXTRA}_r$REPEAT
fi
# "area": the coarse rule of tree models since 2026-12-07 (inference.tree_model.coarse); in the name, so a file
# trained with the earlier rule at the old path is not reused for one
OUT=$CKPT/tree_model/${TAG}_grid${GRID_MM}_area_it${ITERS}_s${SEED}/tree_model.pth
if [ -f "$OUT" ]; then
  step "2/4 reusing $OUT (delete it to train again)"
else
  step "2/4 train_tree_model.py: $ITERS iterations, $GRID_MM mm grid"
  $PY train_tree_model.py "${DATA_ARGS[@]}" --splits train,val --iterations "$ITERS" --grid_mm "$GRID_MM" \
      --seed "$SEED" --out "$OUT" >&2
fi

RUN=$(dirname "$OUT")
if [ "$WILL_BRANCH" = 1 ]; then
  # the networks learn VESSEL_MODEL's masks: its hash names the file, so another vessel model gets its own
  VSHA=$($PY -c "import sys; from utils.provenance import file_sha256; print(file_sha256(sys.argv[1])[:12])" "$VESSEL_MODEL")
  WITH=$RUN/tree_model_branches_s${BRANCH_SEEDS}_v$VSHA.pth
  if [ -f "$WITH" ]; then
    step "3/4 reusing $WITH (delete it to train again)"
  else
    step "3/4 branch networks on $VESSEL_MODEL's masks of the $EXTRA extra phantoms"
    salience_maps $XP "$DATA/lists"  # the vessel model reads offline salience maps
    $PY test.py --dataset $XP --root_path "$DATA" --list_dir "$DATA/lists" --split train --eval_roi liver --model_path "$VESSEL_MODEL" \
        --save_pred h5 --pred_kind mask --output "$RUN/masks_${XP}_v$VSHA" >&2
    $PY train_branch_model.py --tree_model "$OUT" --data "$DATA" $XP "$RUN/masks_${XP}_v$VSHA" --seeds "$BRANCH_SEEDS" \
        --out "$WITH" >&2
  fi
  OUT=$WITH
else
  step "3/4 no branch networks (BRANCHES=$BRANCHES; they need a vessel model and EXTRA_PHANTOMS > 0)"
fi

if [ -f "$VESSEL_MODEL" ]; then
  step "4/4 test.py: $VESSEL_MODEL + the tree model, inside the liver"
  $PY test.py --dataset $PH --root_path "$DATA" --list_dir "$DATA/lists" --model_path "$VESSEL_MODEL" \
      --tree_model "$OUT" --eval_roi liver --output "$RUN/eval_phantom_test" >&2
  if [ "$HAVE_REAL" = 1 ] && [ "$MIX" != 1 ]; then
    $PY test.py --dataset $REAL --root_path "$DATA" --list_dir "$DATA/lists/test_real" --model_path "$VESSEL_MODEL" \
        --tree_model "$OUT" --eval_roi liver --output "$RUN/eval_real" >&2
  fi
else
  step "4/4 no vessel model at $VESSEL_MODEL (make demo makes one): not tested"
fi
echo "tree model: $OUT"
