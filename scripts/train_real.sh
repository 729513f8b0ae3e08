#!/usr/bin/env bash
# Train a vessel model on phantoms plus every real patient you have (issue 27), and print its path:
#
#   bash scripts/train_real.sh                           # the real patients of ../shared/real
#   REAL_SRC=/data/3Dircadb1 bash scripts/train_real.sh  # every 3Dircadb1.<n> there
#
# Ends with "model: <path to best_model.pth>", the file predict.py takes (it embeds the salience
# generator). Settings chosen by scripts/real_curves.sh (docs/RESULTS.md, "Learning curves on real
# CT": trained on one real patient, tested on the other, both ways): 1500 iterations on a CPU
# (400-5000 are flat pooled, and more iterations learn the training patient's annotation, not
# vessels), PHANTOM_RATIO 3 (without phantoms the model trained on patient 7 fell to Dice 0.27
# on patient 1), 16 channels (32 were no better and 2.6 times slower), lr 3e-3 from scratch,
# offline bank salience (better than none over three seeds, with fewer spurious pieces).
#
# Steps, each through the project's commands (complete stages are reused):
#   1. scripts/prepare_phantom.sh: the make-demo phantoms, the bank head fine-tuned on them
#      (fixed normalisation), their three-plane maps.
#   2. preprocess.py on REAL_SRC (portal vein + venous system, the liver's slices), and their
#      maps with the same head: one generator for all the training data.
#   3. scripts/mix_datasets.py: every real patient's slices and PHANTOM_RATIO times as many
#      phantom slices (the mixed folder carries both manifests, so the model embeds the head).
#   4. main.py: a 2-D U-Net at 0.9 mm per pixel, offline salience. Model selection: with one or
#      two real patients none is left to select by, and a real patient's own slices would
#      reward over-fitting; so the run validates once, at the end, and best_model.pth is the
#      last weights (the phantoms' validation cases are another domain).
#
# Environment: REAL_SRC (default ../shared/real), REAL_DATA (data/real), REAL_CKPT
# (checkpoint/real), PHANTOM_RATIO (3), ITERS (1500 on a CPU, 6000 with CUDA), BATCH (4; 16 with
# CUDA), WIDTH (base channels: 16; 32 with CUDA), LR (0.003), SALIENCE (offline | none; default
# offline), SEED (0), PY (.venv/bin/python).
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REAL_SRC=${REAL_SRC:-../shared/real}
DATA=${REAL_DATA:-data/real}
CKPT=${REAL_CKPT:-checkpoint/real}
RATIO=${PHANTOM_RATIO:-3}
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
ITERS=${ITERS:-$([ "$CUDA" = 1 ] && echo 6000 || echo 1500)}
BATCH=${BATCH:-$([ "$CUDA" = 1 ] && echo 16 || echo 4)}
WIDTH=${WIDTH:-$([ "$CUDA" = 1 ] && echo 32 || echo 16)}
LR=${LR:-0.003}
SALIENCE=${SALIENCE:-offline}
SEED=${SEED:-0}
REAL=ircadb_real  # not "3D-IRCADb": that name brings the authors' seed split of 20 patients
HEAD=${DEMO_CKPT:-checkpoint}/salience/fixed/phantom/bank_fit.pth
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*" >&2; }

if ! ls -d "$REAL_SRC"/3Dircadb1.* >/dev/null 2>&1; then
  echo "error: no 3Dircadb1.<n> patient folder under '$REAL_SRC' (set REAL_SRC)" >&2
  exit 2
fi

step "1/4 phantoms, the fitted head, their maps (scripts/prepare_phantom.sh)"
DEMO_NORMALISATION=fixed bash scripts/prepare_phantom.sh >&2

step "2/4 real patients under $REAL_SRC -> $DATA, maps with the phantom-fitted head"
$PY preprocess.py --dataset $REAL --src "$REAL_SRC" --root_path "$DATA" --list_dir "$DATA/lists/all" \
    --workers 2 --split 100/0/0 >&2
$PY salience_generation.py --dataset $REAL --root_path "$DATA" --list_dir "$DATA/lists/all" --generator bank \
    --weights "$HEAD" --normalisation fixed >&2
LISTS=$DATA/lists/train_all/$REAL
mkdir -p "$LISTS"
cp "$DATA/lists/all/$REAL/vol_train.txt" "$LISTS/vol_train.txt"
cp "$DATA/lists/all/$REAL/vol_train.txt" "$LISTS/vol_val.txt"  # read once, at the end (see step 4)
: > "$LISTS/vol_test.txt"

step "3/4 mix: $(wc -l < "$LISTS/vol_train.txt") real patient(s) + $RATIO x as many phantom slices"
rm -rf "$DATA/mix" "$DATA/lists/mix"
$PY scripts/mix_datasets.py --real_root "$DATA/$REAL" --real_list_dir "$LISTS" \
    --real_slices "$DATA/lists/all/$REAL/slice_train.txt" --phantom_root "${DEMO_DATA:-data}/phantom" \
    --phantom_list_dir list/phantom --phantom_ratio "$RATIO" --out "$DATA/mix/$REAL" \
    --out_list_dir "$DATA/lists/mix/$REAL" >&2

step "4/4 train: 2-D U-Net ($WIDTH channels), salience $SALIENCE, $ITERS iterations, batch $BATCH"
ARGS=(--dataset $REAL --root_path "$DATA/mix" --list_dir "$DATA/lists/mix" --output_root "$CKPT"
      --backbone unet --model_kwargs "{\"base_channels\": $WIDTH}" --salience "$SALIENCE"
      --target_spacing 0.9 --img_size 192 192 --batch_size "$BATCH" --optimizer adamw --base_lr "$LR"
      --loss bce+dice --max_epochs 1000 --max_iterations "$ITERS" --val_every "$ITERS" --domain_aug 1
      --min_component_mm3 20 --seed "$SEED" --exp "real_${SALIENCE}_w${WIDTH}_r${RATIO}_it${ITERS}_s${SEED}")
RUN=$($PY main.py "${ARGS[@]}" --print_run_dir)
$PY main.py "${ARGS[@]}" --reuse >&2
echo "model: $RUN/best_model.pth"
