#!/usr/bin/env bash
# How pretrained/bank_head_phantom.pth was made (CPU, about 20 minutes on 2 cores).
# Stage 1: fit the bank head on the 8 training patients of 12 "demo" phantoms (0.9 x 0.9 x 1.6 mm).
# Stage 2: fine-tune it on those 8 plus the 8 training patients of 12 "tiny" phantoms
#          (1.5 x 1.5 x 2.5 mm), so the head also works at a coarser grid.
# It is a phantom-trained default: on real CT, fit your own head on your training split
# (python salience_generation.py --dataset 3D-IRCADb --fit) or use the authors' fpn weights.
set -euo pipefail
W=${W:-/tmp/bank_head_work}
PY=${PY:-.venv/bin/python}
$PY make_phantoms.py --out $W/raw_demo --cases 12 --preset demo --seed 0 --workers 2
$PY make_phantoms.py --out $W/raw_tiny --cases 12 --preset tiny --seed 1 --workers 2
$PY preprocess.py --dataset phantom --src $W/raw_demo --root_path $W/data --list_dir $W/list
$PY preprocess.py --dataset phantom_tiny --src $W/raw_tiny --root_path $W/data --list_dir $W/list
$PY salience_generation.py --dataset phantom --root_path $W/data --list_dir $W/list --fit --fit_only \
    --iters 600 --batch 8 --patch 96 --lr 2e-3 --seed 0 --checkpoint_dir $W/ck --device cpu
# a dataset whose training list is both training splits (vol_data entries are links)
mkdir -p $W/data/phantom_mix/vol_data $W/list/phantom_mix
: > $W/list/phantom_mix/vol_train.txt
for pair in phantom:demo phantom_tiny:tiny; do
  ds=${pair%%:*}; tag=${pair##*:}
  for c in $(cat $W/list/$ds/vol_train.txt); do
    ln -sf $W/data/$ds/vol_data/$c.h5 $W/data/phantom_mix/vol_data/${tag}_$c.h5
    echo ${tag}_$c >> $W/list/phantom_mix/vol_train.txt
  done
done
: > $W/list/phantom_mix/vol_val.txt; : > $W/list/phantom_mix/vol_test.txt
$PY salience_generation.py --dataset phantom_mix --root_path $W/data --list_dir $W/list --fit --fit_only \
    --weights $W/ck/phantom/bank_fit.pth --iters 400 --batch 8 --patch 96 --lr 1e-3 --seed 1 \
    --checkpoint_dir $W/ck --device cpu
cp $W/ck/phantom_mix/bank_fit.pth pretrained/bank_head_phantom.pth
