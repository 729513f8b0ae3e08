# Shared by the ablation scripts (source it): train one configuration and test it.
#
#   train_and_test BACKBONE MODE EXP [extra main.py args...]
# trains BACKBONE with --salience MODE into run folder .../EXP, tests it on the test split
# (report in <run>/eval_test), reuses a finished run trained with the same options (main.py
# --reuse; a run made with other options stops the script with an error), and appends
# "label=<run>/eval_test" to the array RUNS. Reads MODEL_KW (JSON; empty: the backbone's
# defaults) and the settings below, each overridable from the environment. 2-D runs resample
# every slice to TARGET_SPACING mm per pixel (default 0.9, the demo phantoms' spacing) and
# train on 192 x 192 tiles of it; 3-D runs use their patches on the stored grid. DOMAIN_AUG
# (default 1) and MIN_COMPONENT (mm^3, default 20) are main.py's --domain_aug and
# --min_component_mm3, as in make demo.
PY=${PY:-.venv/bin/python}
DATA=${DEMO_DATA:-data}
CKPT=${DEMO_CKPT:-checkpoint}
DATASET=${DATASET:-phantom}
ITERS=${ITERS:-400}
SEED=${SEED:-0}
TARGET_SPACING=${TARGET_SPACING:-0.9}
DOMAIN_AUG=${DOMAIN_AUG:-1}         # the demo's settings: intensity randomisation on,
MIN_COMPONENT=${MIN_COMPONENT:-20}  # components under 20 mm^3 dropped
NORM=${DEMO_NORMALISATION:-fixed}  # prepare_phantom.sh's salience rule: its head lives by it
HEAD=${HEAD:-$CKPT/salience/$([ "$NORM" = volume ] || echo "$NORM/")$DATASET/bank_fit.pth}  # e2e head initialisation
RUNS=()

# The phantom dataset is made (or reused) by prepare_phantom.sh; others must be prepared.
prepare_data() {
  if [ "$DATASET" = phantom ]; then bash scripts/prepare_phantom.sh; fi
}

# 2 or 3: the dimensionality of BACKBONE (with MODEL_KW) in the registry
backbone_dims() {
  $PY -c "import json, sys
from networks.registry import spatial_dims_of
try:
    print(spatial_dims_of(sys.argv[1], **json.loads(sys.argv[2] or '{}')))
except ValueError as e:
    sys.exit(f'error: {e}')" "$1" "${MODEL_KW:-}"
}

# "DIMS EPOCHS" for BACKBONE (MODEL_KW): its dimensionality from the registry (a name pattern
# missed unet3d_bilinear and 2-D MONAI nets), and --max_epochs: 100, the demo's (the run
# folder is named by it), or as many epochs of batch 4 as ITERS needs, so that ITERS and
# not the epoch count ends a run (ITERS=20000 stopped at 100 epochs of the phantoms' slices)
dims_and_epochs() {
  local dims items=250
  dims=$(backbone_dims "$1") || return 2
  if [ "$dims" = 2 ]; then
    items=$($PY -c "import sys
from utils.h5io import DatasetPaths, read_list
try:
    print(len(read_list(DatasetPaths.of(sys.argv[1], sys.argv[2]).list_file('slice_train'))))
except FileNotFoundError as e:
    sys.exit(f'error: {e}')" "$DATA" "$DATASET") || return 2
  fi
  local per=$(( items / 4 > 0 ? items / 4 : 1 ))
  local epochs=$(( (ITERS + per - 1) / per ))
  echo "$dims $(( epochs > 100 ? epochs : 100 ))"
}

# HEAD_ARGS for salience MODE: e2e starts from the same fitted head the offline maps came from
# (without it, from an untrained head, which is another experiment): --head "$HEAD", or an error
# when there is none; nothing for the other modes
e2e_head_args() {
  HEAD_ARGS=()
  [ "$1" = e2e ] || return 0
  if [ ! -f "${HEAD:-}" ]; then
    echo "error: e2e starts from the fitted salience head, and there is none at '${HEAD:-}' (set HEAD)" >&2
    return 2
  fi
  HEAD_ARGS=(--head "$HEAD")
}

train_and_test() {
  local backbone=$1 mode=$2 exp=$3; shift 3
  local found dims epochs
  found=$(dims_and_epochs "$backbone") || return 2
  read -r dims epochs <<< "$found"
  local size_args=(--img_size 192 192 --target_spacing "$TARGET_SPACING")
  [ "$dims" = 3 ] && size_args=(--patch_size 64 64 32)
  e2e_head_args "$mode" || return 2
  local extra=("${HEAD_ARGS[@]}")
  local args=(--dataset "$DATASET" --root_path "$DATA" --output_root "$CKPT" --backbone "$backbone"
              --salience "$mode" "${size_args[@]}" --batch_size 4 --optimizer adamw --base_lr 0.003
              --loss bce+dice --max_epochs "$epochs" --max_iterations "$ITERS" --val_every 200
              --domain_aug "$DOMAIN_AUG" --min_component_mm3 "$MIN_COMPONENT"
              --seed "$SEED" --deterministic 1 --exp "$exp" "${extra[@]}" "$@")
  [ -n "${MODEL_KW:-}" ] && args+=(--model_kwargs "$MODEL_KW")
  local run_dir
  run_dir=$($PY main.py "${args[@]}" --print_run_dir)
  echo; echo "== $backbone, salience $mode, $ITERS iterations -> $run_dir"
  $PY main.py "${args[@]}" --reuse
  # test.py keeps the report only when this model file, these options and this code made it
  $PY test.py --dataset "$DATASET" --root_path "$DATA" --backbone "$backbone" \
      --model_path "$run_dir/best_model.pth" --eval_roi liver --output "$run_dir/eval_test"
  RUNS+=("$backbone/$mode=$run_dir/eval_test")
}
