#!/usr/bin/env bash
# Sim-to-real benchmark: does a model trained on phantoms segment real CT, does real data
# alone do better, and does phantom pretraining help a model fine-tuned on one real patient?
# Each with none / offline / e2e salience, over seeds; tested inside the liver on real
# 3D-IRCADb patients, at a millimetre-matched scale (--target_spacing).
#
#   bash scripts/sim_to_real.sh                       # defaults: seed 0 on a CPU, seeds 0 1 2 on a GPU
#   SEEDS="0 1 2" bash scripts/sim_to_real.sh         # three seeds on the CPU (about 3 hours on 2 cores)
#   MODES="none offline" bash scripts/sim_to_real.sh  # without e2e (about 40 minutes a seed on 2 cores)
#
# Scenarios (rows of the table), for each salience mode:
#   phantom      the demo-settings phantom model (lib_runs.sh), tested on both real patients
#   real         trained on one real patient from scratch, tested on the other, both ways
#   phantom+real --init_from the phantom model, fine-tuned on one real patient, tested on the other
#   phantom+real, mixed   the same fine-tune on the real patient's slices and as many phantom
#                training slices (MIX_RUNS=1), so the model keeps seeing the phantoms' variety
# No third real patient is available for model selection: real runs keep their last weights
# (validation only at the end). Offline salience on the real patients uses the phantom-fitted
# head, the same generator the phantom models were trained with.
#
# Environment: REAL_SRC (folder with 3Dircadb1.1 and 3Dircadb1.7; default ../shared/real),
# SEEDS (default "0 1 2" where CUDA is present, "0" on a CPU-only machine), MODES (default "none offline e2e"), REAL_RUNS (default 1; 0 skips
# the runs trained on a real patient), MIX_RUNS (default 1; 0 skips the mixed fine-tunes),
# ITERS (phantom iterations,
# lib_runs.sh default), FT_ITERS (iterations on a real patient), FT_LR (learning rate of the
# fine-tune from phantoms, default 3e-4: a tenth of the rate runs from scratch use, so that
# 150 iterations adapt the phantom model rather than retrain it), FT_FREEZE_BN (default 0; 1:
# the fine-tune keeps the phantom model's BatchNorm statistics, main.py --freeze_bn), S2R_DATA,
# and lib_runs.sh's
# (TARGET_SPACING: the mm per pixel every 2-D model sees, phantom or real).
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
# a taken record name fails now, not after the training
[ -z "${RECORD:-}" ] || ${PY:-.venv/bin/python} -m utils.records "$RECORD"
BACKBONE=${BACKBONE:-unet}
MODEL_KW=${MODEL_KW:-'{"base_channels": 16}'}
source scripts/lib_runs.sh
# the real-patient runs resample 2-D slices and the mixed data holds phantom slices only
dims=$(backbone_dims "$BACKBONE")
[ "$dims" = 2 ] || { echo "error: sim_to_real.sh trains 2-D backbones; $BACKBONE is 3-D" >&2; exit 2; }
REAL_SRC=${REAL_SRC:-../shared/real}
S2R=${S2R_DATA:-$DATA/s2r}
# one seed on a CPU-only machine (about an hour on 2 cores, e2e a third of it), three where CUDA is present
SEEDS=${SEEDS:-$($PY -c "import torch; print('0 1 2' if torch.cuda.is_available() else '0')")}
MODES=${MODES:-"none offline e2e"}
FT_ITERS=${FT_ITERS:-150}
FT_LR=${FT_LR:-0.0003}
FT_FREEZE_BN=${FT_FREEZE_BN:-0}
FBN=$([ "$FT_FREEZE_BN" = 1 ] && echo _fbn || true)  # run-name tag
REAL_RUNS=${REAL_RUNS:-1}  # 0: only the phantom models (tested on the real patients)
MIX_RUNS=${MIX_RUNS:-1}    # 0: no fine-tunes on real + phantom slices
REAL=3D-IRCADb
LISTS=$S2R/lists
PATIENTS=(case0001 case0007)
T0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - T0 )) s] $*"; }

for p in 1 7; do
  if [ ! -d "$REAL_SRC/3Dircadb1.$p" ]; then
    echo "error: $REAL_SRC/3Dircadb1.$p not found (set REAL_SRC to the folder of the real patients)" >&2
    exit 2
  fi
done

# lists: <name> train case, val case, test cases
write_lists() {
  local name=$1 train=$2 test=$3 dir=$LISTS/$1/$REAL
  mkdir -p "$dir"
  printf '%s\n' $train > "$dir/vol_train.txt"
  printf '%s\n' $train > "$dir/vol_val.txt"   # no third patient: validate on the training one
  printf '%s\n' $test > "$dir/vol_test.txt"
  if [ "$name" != all ] && [ -n "$train" ] && [ -f "$LISTS/all/$REAL/slice_train.txt" ]; then
    grep -E "^($(echo $train | tr ' ' '|'))_slice" "$LISTS/all/$REAL/slice_train.txt" > "$dir/slice_train.txt"
  fi
}

step "prepare: phantom data, real patients -> $S2R, three-plane salience with the phantom-fitted head"
prepare_data
write_lists all "${PATIENTS[*]}" "${PATIENTS[*]}"
$PY preprocess.py --dataset $REAL --src "$REAL_SRC" --root_path "$S2R" --list_dir "$LISTS/all" --workers 2
$PY salience_generation.py --dataset $REAL --root_path "$S2R" --list_dir "$LISTS/all" --generator bank --weights "$HEAD" --normalisation "$NORM"
write_lists both_test "" "${PATIENTS[*]}"
write_lists train1 case0001 case0007
write_lists train7 case0007 case0001

# make_mix P: dataset root $S2R/mix<P> (symlinks) with both real patients and the phantom
# training cases renamed ph<NNNN>; its training list: patient P's slices and as many phantom
# slices (scripts/mix_datasets.py); validation and test lists those of train<P>
make_mix() {
  $PY scripts/mix_datasets.py --real_root "$S2R/$REAL" --real_list_dir "$LISTS/train$1/$REAL" \
      --real_slices "$LISTS/all/$REAL/slice_train.txt" --phantom_root "$DATA/phantom" --phantom_list_dir list/phantom \
      --out "$S2R/mix$1/$REAL" --out_list_dir "$LISTS/mix$1/$REAL"
}
if [ "$MIX_RUNS" = 1 ]; then make_mix 1; make_mix 7; fi

# test_real RUN_DIR LISTNAME: test RUN_DIR's model on that list's test split -> RUN_DIR/eval_<LISTNAME>
test_real() {
  local run_dir=$1 list=$2 model=${3:-best_model.pth}
  local out=$run_dir/eval_real_$list
  [ -f "$run_dir/$model" ] || { echo "error: no model file $run_dir/$model to test" >&2; exit 1; }
  # test.py keeps the report only when this model file, these options and this code made it
  $PY test.py --dataset $REAL --root_path "$S2R" --list_dir "$LISTS/$list" --backbone "$BACKBONE" \
      --model_path "$run_dir/$model" --eval_roi liver --output "$out" >/dev/null
  echo "$out"
}

# train_real MODE EXP LISTNAME [extra main.py args]: one run on a real patient, prints its folder
train_real() {
  local mode=$1 exp=$2 list=$3; shift 3
  local root=$S2R
  if [[ $list == mix* ]]; then root=$S2R/$list; fi
  local extra=()
  # e2e from scratch starts from the fitted head; an e2e --init_from brings its own
  if [[ " $* " != *" --init_from "* ]]; then
    e2e_head_args "$mode" || return 2
    extra=("${HEAD_ARGS[@]}")
  fi
  local args=(--dataset $REAL --root_path "$root" --list_dir "$LISTS/$list" --output_root "$CKPT/s2r"
              --backbone "$BACKBONE" --salience "$mode" --img_size 192 192 --target_spacing "$TARGET_SPACING" --batch_size 4
              --optimizer adamw --loss bce+dice --max_epochs 1000
              --max_iterations "$FT_ITERS" --val_every "$FT_ITERS" --seed "$SEED" --deterministic 1 --exp "$exp"
              --domain_aug "$DOMAIN_AUG" --min_component_mm3 "$MIN_COMPONENT"
              --model_kwargs "$MODEL_KW" "${extra[@]}" "$@")
  local run_dir
  run_dir=$($PY main.py "${args[@]}" --print_run_dir)
  $PY main.py "${args[@]}" --reuse >&2
  echo "$run_dir"
}

declare -A POOL
for SEED in $SEEDS; do
  for MODE in $MODES; do
    step "seed $SEED, salience $MODE: phantom model"
    RUNS=()
    train_and_test "$BACKBONE" "$MODE" "ablation_${MODE}_it${ITERS}_seed${SEED}"
    ph_run=${RUNS[0]#*=}; ph_run=${ph_run%/eval_test}
    POOL[phantom/$MODE]+="$(test_real "$ph_run" both_test),"
    [ "$REAL_RUNS" = 1 ] || continue
    for dir in 1:7 7:1; do
      tr=${dir%:*}; te=${dir#*:}
      step "seed $SEED, salience $MODE: real patient $tr -> $te (scratch, then from phantoms)"
      run=$(train_real "$MODE" "real${tr}_${MODE}_it${FT_ITERS}_seed${SEED}" "train$tr" --base_lr 0.003)
      POOL[real/$MODE]+="$(test_real "$run" "train$tr" last.pth),"
      run=$(train_real "$MODE" "ft${tr}_${MODE}_it${FT_ITERS}_lr${FT_LR}${FBN}_seed${SEED}" "train$tr" \
            --base_lr "$FT_LR" --freeze_bn "$FT_FREEZE_BN" --init_from "$ph_run/best_model.pth")
      POOL[phantom+real/$MODE]+="$(test_real "$run" "train$tr" last.pth),"
      [ "$MIX_RUNS" = 1 ] || continue
      run=$(train_real "$MODE" "ftmix${tr}_${MODE}_it${FT_ITERS}_lr${FT_LR}${FBN}_seed${SEED}" "mix$tr" \
            --base_lr "$FT_LR" --freeze_bn "$FT_FREEZE_BN" --init_from "$ph_run/best_model.pth")
      POOL[phantom+real mixed/$MODE]+="$(test_real "$run" "train$tr" last.pth),"
    done
  done
done

ROWS=()
for scen in phantom real phantom+real "phantom+real mixed"; do
  for MODE in $MODES; do
    if [ -n "${POOL[$scen/$MODE]:-}" ]; then ROWS+=("$scen, $MODE=${POOL[$scen/$MODE]%,}"); fi
  done
done
OUT=$CKPT/s2r/sim_to_real_${BACKBONE/:/_}_it${ITERS}_ft${FT_ITERS}_lr${FT_LR}${FBN}_${MODES// /-}_seeds${SEEDS// /}.md
step "table (mean [95% CI] over test cases x seeds) -> $OUT"
# RECORD=NAME also writes results/NAME.json, the record docs/RESULTS.md renders
$PY scripts/compare_runs.py --ci --out "$OUT" "${ROWS[@]}" ${RECORD:+--record "$RECORD"}
