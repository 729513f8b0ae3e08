#!/usr/bin/env bash
# Learning curves on real CT (issue 27): scripts/train_real.sh trained on one real patient (plus
# phantoms), tested inside the liver on the other, both ways (1 -> 7 and 7 -> 1), against
#   iterations      ITERS_LIST   (default "400 1500 5000"; width 16, phantom share 1, offline)
#   phantom share   RATIO_LIST   (default "0 1 3": none, as many slices as real ones, three times)
#   model width     WIDTH_LIST   (default "16 32"; at the chosen setting)
#   salience        none vs offline over SEEDS (default "0 1 2"), at the chosen setting
# The chosen setting is what the first two axes picked and scripts/train_real.sh uses on a CPU:
# 1500 iterations, CHOSEN_RATIO (default 3) phantom slices per real slice, width 16.
# One table each (mean [95% CI] over both directions and seeds, scripts/compare_runs.py); with
# RECORD=<prefix> also results/<prefix>_{iterations,phantoms,width,salience}.json for the docs.
#
#   bash scripts/real_curves.sh                      # about 20 runs of 5-30 minutes on 2 CPU cores
#   AXES="iterations" RECORD=real_curves bash scripts/real_curves.sh
#
# Environment: REAL_SRC (holds 3Dircadb1.1 and 3Dircadb1.7; default ../shared/real), CURVES_DATA
# (default data/curves), AXES (default "iterations phantoms width salience": the last two run at
# what the first two chose), the lists above, CHOSEN_RATIO, PY. Complete stages and finished runs
# are reused (main.py --reuse, test.py's provenance).
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REAL_SRC=${REAL_SRC:-../shared/real}
OUT=${CURVES_DATA:-data/curves}
AXES=${AXES:-"iterations phantoms width salience"}
# a taken record name fails now, not after the training of the first axes
if [ -n "${RECORD:-}" ]; then $PY -m utils.records $(for a in $AXES; do echo "${RECORD}_$a"; done); fi
ITERS_LIST=${ITERS_LIST:-"400 1500 5000"}
WIDTH_LIST=${WIDTH_LIST:-"16 32"}
RATIO_LIST=${RATIO_LIST:-"0 1 3"}
SEEDS=${SEEDS:-"0 1 2"}
CHOSEN_RATIO=${CHOSEN_RATIO:-3}
REAL=ircadb_real
HEAD=${DEMO_CKPT:-checkpoint}/salience/fixed/phantom/bank_fit.pth
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*" >&2; }

for p in 1 7; do
  if [ ! -d "$REAL_SRC/3Dircadb1.$p" ]; then
    echo "error: $REAL_SRC/3Dircadb1.$p not found (set REAL_SRC)" >&2
    exit 2
  fi
  mkdir -p "$OUT/only$p"
  ln -sfn "$(cd "$REAL_SRC/3Dircadb1.$p" && pwd)" "$OUT/only$p/3Dircadb1.$p"
done

step "test data: both real patients with the phantom-fitted head's maps"
DEMO_NORMALISATION=fixed bash scripts/prepare_phantom.sh >&2
$PY preprocess.py --dataset $REAL --src "$REAL_SRC" --root_path "$OUT/test" --list_dir "$OUT/test/lists/all" \
    --workers 2 --split 100/0/0 >&2
$PY salience_generation.py --dataset $REAL --root_path "$OUT/test" --list_dir "$OUT/test/lists/all" \
    --generator bank --weights "$HEAD" --normalisation fixed >&2
for p in 1 7; do
  d=$OUT/test/lists/on$p/$REAL
  mkdir -p "$d"
  printf 'case%04d\n' "$p" > "$d/vol_test.txt"
  : > "$d/vol_train.txt"
  : > "$d/vol_val.txt"
done

# one SETTINGS: train on each patient, test on the other; prints the two report folders "a,b"
both_ways() {
  local reports=()
  for dir in 1:7 7:1; do
    local tr=${dir%:*} te=${dir#*:} model
    step "train on $tr ($*), test on $te"
    model=$(env "$@" REAL_SRC="$OUT/only$tr" REAL_DATA="$OUT/train$tr" REAL_CKPT="$OUT/ckpt$tr" \
            bash scripts/train_real.sh | sed -n 's/^model: //p')
    [ -n "$model" ] && [ -f "$model" ] || { echo "error: train_real.sh printed no model for $* (got '$model')" >&2; exit 1; }
    local report
    report=$(dirname "$model")/eval_on$te
    $PY test.py --dataset $REAL --root_path "$OUT/test" --list_dir "$OUT/test/lists/on$te" --backbone unet \
        --model_path "$model" --eval_roi liver --output "$report" >&2
    reports+=("$report")
  done
  (IFS=,; echo "${reports[*]}")
}

table() {  # NAME LABEL=REPORTS...
  local name=$1; shift
  step "table: $name"
  $PY scripts/compare_runs.py --ci --out "$OUT/$name.md" "$@" ${RECORD:+--record "${RECORD}_$name"}
}

for axis in $AXES; do
  rows=()
  case "$axis" in
    iterations) for it in $ITERS_LIST; do rows+=("$it iterations=$(both_ways ITERS=$it WIDTH=16 PHANTOM_RATIO=1)"); done ;;
    width) for w in $WIDTH_LIST; do rows+=("$w channels=$(both_ways ITERS=1500 WIDTH=$w PHANTOM_RATIO=$CHOSEN_RATIO)"); done ;;
    phantoms) for r in $RATIO_LIST; do rows+=("phantoms ${r}x=$(both_ways ITERS=1500 WIDTH=16 PHANTOM_RATIO=$r)"); done ;;
    salience)
      for mode in none offline; do
        pooled=""
        for seed in $SEEDS; do
          pooled+="$(both_ways ITERS=1500 WIDTH=16 PHANTOM_RATIO=$CHOSEN_RATIO SALIENCE=$mode SEED=$seed),"
        done
        rows+=("$mode=${pooled%,}")
      done ;;
    *) echo "error: unknown axis $axis (iterations, width, phantoms, salience)" >&2; exit 2 ;;
  esac
  table "$axis" "${rows[@]}"
done
