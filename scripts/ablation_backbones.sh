#!/usr/bin/env bash
# Backbone ablation: unet, attention_unet, unetpp and unet3d, each without and with
# (offline) salience, same budget and seed, then one comparison table.
#
#   bash scripts/ablation_backbones.sh                  # CPU, demo phantoms: 8 runs of 400 iterations (~45 min)
#   ITERS=20000 FULL_SIZE=1 DATASET=3D-IRCADb bash scripts/ablation_backbones.sh   # a GPU box, real data
#
# Environment: ITERS (400), SEED (0), DATASET (phantom), FULL_SIZE (set: each backbone's
# default width; unset: about 16 base channels each, for a CPU), BACKBONES (space-separated,
# default "unet attention_unet unetpp unet3d"; a plug-in or monai:<Class> name too), MODES
# ("none offline"), MODEL_KW (JSON: the arguments of each backbone this script has no width for,
# e.g. your plug-in's, so it is compared at a width like the others'; empty: its defaults).
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
# a taken record name fails now, not after the training
[ -z "${RECORD:-}" ] || ${PY:-.venv/bin/python} -m utils.records "$RECORD"
BACKBONES=${BACKBONES:-"unet attention_unet unetpp unet3d"}
MODES=${MODES:-"none offline"}
source scripts/lib_runs.sh

# backbone arguments: comparable small widths for a CPU run, the defaults with FULL_SIZE; MODEL_KW
# (lib_runs.sh reads it per run) for the backbones named nowhere here
USER_KW=${MODEL_KW:-}
kw_for() {
  case "$1" in
    unet|unet3d|attention_unet|unetpp) [ -n "${FULL_SIZE:-}" ] && return 0 ;;
    *) echo "$USER_KW"; return 0 ;;
  esac
  case "$1" in
    unet|unet3d) echo '{"base_channels": 16}' ;;
    attention_unet) echo '{"channels": [16, 32, 64, 128, 256]}' ;;
    unetpp) echo '{"features": [16, 16, 32, 64, 128, 16]}' ;;
  esac
}

prepare_data
for backbone in $BACKBONES; do
  MODEL_KW=$(kw_for "$backbone")
  for mode in $MODES; do
    train_and_test "$backbone" "$mode" "ablation_${mode}_it${ITERS}_seed${SEED}"
  done
done
# named by what it compares: another choice of backbones or modes does not replace this table
# shellcheck disable=SC2086  # word-split on purpose: any spacing gives one name
SET=$(printf '%s-' $BACKBONES $MODES | tr ':/' '__')
SET=${SET%-}
OUT=$CKPT/$DATASET/ablation_backbones_${SET}_it${ITERS}_seed${SEED}.md
echo
# RECORD=NAME also writes results/NAME.json, the record docs/RESULTS.md renders
$PY scripts/compare_runs.py --out "$OUT" "${RUNS[@]}" ${RECORD:+--record "$RECORD"}
echo "comparison table: $OUT"
