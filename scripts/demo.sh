#!/usr/bin/env bash
# make demo: the whole pipeline on phantom patients, on the CPU, in under 10 minutes
# (2 cores): phantoms -> HDF5 -> salience head fit + three-plane salience -> U-Net with
# offline salience -> test.py. A second run reuses every stage that is complete.
#
# Then predict.py on two new scans: a demo phantom with the vessel model alone, and a whole-abdomen
# phantom, whole (issue 26): its liver found by a liver model and its vessels split into the portal
# and the hepatic tree by a tree model, both trained here at demo size, on phantoms only.
#
# Environment: DEMO_ITERS (training iterations, default 400), DEMO_SPACING (mm per pixel the
# slices are resampled to, default 0.9: the demo phantoms' own spacing, so a 192 x 192 tile
# covers their 173 mm field of view as before; real CT at 0.57-0.87 mm is resampled to it by
# test.py), DEMO_WHOLE (0 skips the whole-abdomen scan), DEMO_LIVER_ITERS (300) and
# DEMO_TREE_ITERS (300): the demo-sized liver and tree models' iterations (scripts/train_liver.sh
# and scripts/train_tree_model.sh train full-size ones), and those of prepare_phantom.sh.
# --domain_aug 1 randomises contrast, level and noise so the phantom-trained model transfers to
# real CT; --min_component_mm3 20 drops specks under 20 mm^3 (a 1 mm vessel 6 mm long) from its
# masks (README, "Phantoms to real CT").
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DEMO_DATA:-data}
CKPT=${DEMO_CKPT:-checkpoint}
ITERS=${DEMO_ITERS:-400}
SPACING=${DEMO_SPACING:-0.9}
export T0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - T0 )) s] $*"; }

bash scripts/prepare_phantom.sh

step "4/5 train unet with offline salience ($ITERS iterations)"
# a 16-channel U-Net: the seed's 64 base channels take ~10x longer per step on a CPU
RUN_ARGS=(--dataset phantom --root_path "$DATA" --output_root "$CKPT" --backbone unet --salience offline
          --model_kwargs '{"base_channels": 16}' --target_spacing "$SPACING" --img_size 192 192
          --batch_size 4 --optimizer adamw
          --base_lr 0.003 --loss bce+dice --max_epochs 100 --max_iterations "$ITERS" --val_every 200
          --domain_aug 1 --min_component_mm3 20 --seed 0 --exp demo)
RUN_DIR=$($PY main.py "${RUN_ARGS[@]}" --print_run_dir)
$PY main.py "${RUN_ARGS[@]}" --reuse  # a model trained with other options stops the demo

step "5/5 test.py on the test phantoms"
$PY test.py --dataset phantom --root_path "$DATA" --backbone unet --model_path "$RUN_DIR/best_model.pth" \
    --eval_roi liver --figures --output "$RUN_DIR/eval_test"
echo
echo "vessel model trained and tested in $(( $(date +%s) - T0 )) s (the demo goes on: new scans)"
echo "results table: $RUN_DIR/eval_test/results.md"
echo "figures:       $RUN_DIR/eval_test/figures/"

# --- segment a new scan (predict.py): a phantom patient the model has never seen, read as a
# plain DICOM series (its masks are not used), with the model file as the only other input
# one phantom patient in folder $1 (preset $2, seed $3), made unless it is there
new_scan() {
  [ -f "$1/phantom_manifest.json" ] || $PY make_phantoms.py --out "$1" --cases 1 --preset "$2" --seed "$3" --overwrite
}
NEW_RAW=$DATA/raw/phantom_new
step "predict.py on a new scan without labels"
new_scan "$NEW_RAW" demo 101
PRED_DIR=$RUN_DIR/predict_new_scan
# the model file embeds its salience generator (main.py took it from the maps' manifest)
$PY predict.py --model "$RUN_DIR/best_model.pth" --input "$NEW_RAW/3Dircadb1.1/PATIENT_DICOM" \
    --output "$PRED_DIR" --mesh --figures
echo
echo "new scan segmented in $(( $(date +%s) - T0 )) s since the demo started"
echo "vessel mask (NIfTI): $PRED_DIR/3Dircadb1.1_vessels.nii.gz"
echo "surface mesh (STL):  $PRED_DIR/3Dircadb1.1_vessels.stl"
echo "figures:             $PRED_DIR/3Dircadb1.1_mip.png, $PRED_DIR/3Dircadb1.1_3d.png"
echo "statistics:          $PRED_DIR/3Dircadb1.1_stats.json"

# --- a new scan, whole: a whole-abdomen phantom (512 x 512, kidneys, spleen, spine, bowel around
# the liver) with no mask given. A liver model keeps the vessels to the liver, a tree model splits
# them into the two trees. Both are demo-sized (a few minutes of CPU, phantoms only): the full-size
# commands are scripts/train_liver.sh and scripts/train_tree_model.sh (docs/USAGE.md).
if [ "${DEMO_WHOLE:-1}" != 1 ]; then
  echo
  echo "demo done in $(( $(date +%s) - T0 )) s"
  echo "vessel model: $RUN_DIR/best_model.pth (python predict.py --model <it> --input SCAN --output DIR)"
  exit 0
fi
step "liver model, demo size (scripts/train_liver.sh, phantoms only, ${DEMO_LIVER_ITERS:-300} iterations)"
# LIVER_ELASTIC=0: the bends were measured on the 1500-iteration models, not at the demo's size
LIVER_MODEL=$(REAL_SRC= LIVER_PHANTOMS=4 LIVER_ITERS=${DEMO_LIVER_ITERS:-300} LIVER_ELASTIC=0 LIVER_DATA="$DATA/liver" \
    LIVER_CKPT="$CKPT/liver" bash scripts/train_liver.sh | sed -n 's/^liver model: //p')
step "tree model, demo size (scripts/train_tree_model.sh, the demo phantoms, ${DEMO_TREE_ITERS:-300} iterations)"
TREE_MODEL=$(REAL_SRC= EXTRA_PHANTOMS=0 ITERS=${DEMO_TREE_ITERS:-300} TREES_DATA="$DATA/trees" \
    TREES_CKPT="$CKPT/trees" VESSEL_MODEL="$RUN_DIR/best_model.pth" bash scripts/train_tree_model.sh \
    | sed -n 's/^tree model: //p')
for m in "$LIVER_MODEL" "$TREE_MODEL"; do
  [ -n "$m" ] && [ -f "$m" ] || { echo "error: the liver or the tree model was not made ('$m')" >&2; exit 1; }
done
WHOLE_RAW=$DATA/raw/phantom_whole
step "predict.py on a whole-abdomen scan: liver, vessels, two trees"
new_scan "$WHOLE_RAW" full 102
WHOLE_DIR=$RUN_DIR/predict_whole_scan
$PY predict.py --model "$RUN_DIR/best_model.pth" --input "$WHOLE_RAW/3Dircadb1.1/PATIENT_DICOM" \
    --liver_model "$LIVER_MODEL" --tree_model "$TREE_MODEL" --output "$WHOLE_DIR" --mesh --figures
echo
echo "whole scan segmented in $(( $(date +%s) - T0 )) s since the demo started"
echo "liver mask:          $WHOLE_DIR/3Dircadb1.1_liver.nii.gz"
echo "two trees:           $WHOLE_DIR/3Dircadb1.1_trees.nii.gz (1 portal vein, 2 hepatic veins)"
echo "figures:             $WHOLE_DIR/3Dircadb1.1_mip.png, $WHOLE_DIR/3Dircadb1.1_3d.png"
echo "statistics:          $WHOLE_DIR/3Dircadb1.1_stats.json"
echo
echo "demo done in $(( $(date +%s) - T0 )) s; the models it made, for predict.py on your own scans:"
echo "vessel model:        $RUN_DIR/best_model.pth"
echo "liver model:         $LIVER_MODEL"
echo "tree model:          $TREE_MODEL"
echo "python predict.py --model $RUN_DIR/best_model.pth --liver_model $LIVER_MODEL --tree_model $TREE_MODEL --input SCAN --output DIR"
