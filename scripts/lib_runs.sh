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

train_and_test() {
  local backbone=$1 mode=$2 exp=$3; shift 3
  local size_args=(--img_size 192 192 --target_spacing "$TARGET_SPACING")
  case "$backbone" in unet3d|monai:*) size_args=(--patch_size 64 64 32) ;; esac
  local extra=()
  # e2e starts from the same fitted head the offline maps came from
  if [ "$mode" = e2e ] && [ -f "${HEAD:-}" ]; then extra=(--head "$HEAD"); fi
  local args=(--dataset "$DATASET" --root_path "$DATA" --output_root "$CKPT" --backbone "$backbone"
              --salience "$mode" "${size_args[@]}" --batch_size 4 --optimizer adamw --base_lr 0.003
              --loss bce+dice --max_epochs 100 --max_iterations "$ITERS" --val_every 200
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
