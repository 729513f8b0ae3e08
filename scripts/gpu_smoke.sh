#!/usr/bin/env bash
# GPU smoke test, a few minutes on one GPU: AMP training steps for unet and unet3d with
# e2e salience, e2e salience generation, torchrun with one process, and predict.py on a
# phantom scan with a tree model trained on the GPU. Tiny synthetic data in the project's
# HDF5 layout (the tests' tiny_dataset, 5 cases of 32 x 32 x 12) and 3 demo phantoms, written
# to a temporary folder. Prints what it did; exits non-zero on the first failure.
#
#   bash scripts/gpu_smoke.sh                     # from the repository root
#   SMOKE_DEVICE=cpu bash scripts/gpu_smoke.sh    # dry run of the same steps on the CPU (no AMP)
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true  # bash >= 4.4: a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
TORCHRUN=${TORCHRUN:-"$PY -m torch.distributed.run"}
DEVICE=${SMOKE_DEVICE:-cuda}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

step() { echo; echo "=== $*"; }

step "environment"
DEVICE=$DEVICE $PY - <<'EOF'
import os
import torch
ok = torch.cuda.is_available()
print("torch", torch.__version__, "| cuda", ok, "|", torch.cuda.get_device_name(0) if ok else "no GPU")
if ok:
    print("bf16 supported:", torch.cuda.is_bf16_supported(), "-> AMP dtype",
          "bfloat16" if torch.cuda.is_bf16_supported() else "float16 + GradScaler")
elif os.environ["DEVICE"] == "cuda":
    raise SystemExit("gpu_smoke.sh: no CUDA device; this script checks the GPU path (SMOKE_DEVICE=cpu: dry run)")
EOF

step "tiny dataset -> $WORK"
PYTHONPATH=.:tests $PY -c "
from pathlib import Path
from conftest import make_tiny_dataset
d = make_tiny_dataset(Path('$WORK'))
print('cases', d.splits)
"
COMMON=(--dataset tiny --root_path "$WORK/data" --list_dir "$WORK/list" --output_root "$WORK/ckpt"
        --device "$DEVICE" --amp 1 --num_workers 2 --max_iterations 6 --val_every 3 --batch_size 2)

step "unet (2-D) + e2e salience, AMP, 6 iterations"
$PY main.py "${COMMON[@]}" --backbone unet --salience e2e --img_size 64 64 \
    --model_kwargs '{"base_channels": 16}' --exp smoke_unet
step "unet3d + e2e salience, AMP, 6 iterations, 32^3 patches"
$PY main.py "${COMMON[@]}" --backbone unet3d --salience e2e --patch_size 32 32 16 \
    --model_kwargs '{"base_channels": 8}' --exp smoke_unet3d

step "checkpoints rebuild on the GPU; e2e salience generation (SalienceModule on the GPU, AMP)"
$PY - "$WORK/ckpt" "$DEVICE" <<'EOF'
import sys
from pathlib import Path
import torch
from networks.checkpoint import load_model
dev = sys.argv[2]
amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if dev == "cuda" else torch.bfloat16
for p in sorted(Path(sys.argv[1]).rglob("last.pth")):
    model, ck = load_model(p, dev)
    dims = ck["spatial_dims"]
    x = torch.rand((2, 1) + ((64, 64) if dims == 2 else (32, 32, 16)), device=dev)
    with torch.no_grad(), torch.autocast(dev, dtype=amp, enabled=dev == "cuda"):
        gated, s = model.gated(x)
        y = model(x)
    print(f"{p.parent.name}: {ck['model_name']} it {ck['iteration']} best Dice {ck['best_metric']:.3f}; "
          f"salience {tuple(s.shape)} {s.dtype} in [{float(s.min()):.3f}, {float(s.max()):.3f}], "
          f"logits {tuple(y.shape)}, finite {bool(torch.isfinite(y).all())}")
EOF

step "salience_generation.py on the GPU (analytic generator: needs no weights), then offline training"
$PY salience_generation.py --dataset tiny --root_path "$WORK/data" --list_dir "$WORK/list" --generator analytic \
    --device "$DEVICE" --overwrite
$PY main.py "${COMMON[@]}" --backbone unet --salience offline --img_size 64 64 \
    --model_kwargs '{"base_channels": 16}' --exp smoke_offline

step "torchrun --nproc_per_node 1 (DDP code path, nccl)"
$TORCHRUN --standalone --nproc_per_node 1 main.py "${COMMON[@]}" --backbone unet --salience e2e \
    --img_size 64 64 --model_kwargs '{"base_channels": 16}' --exp smoke_ddp

step "predict.py on the GPU: 3 demo phantoms with class maps, a tree model trained 5 steps, the offline model"
$PY make_phantoms.py --out "$WORK/raw" --cases 3 --preset demo --seed 7 --workers 2 --overwrite
$PY preprocess.py --dataset smoke_trees --src "$WORK/raw" --root_path "$WORK/data" --list_dir "$WORK/list" \
    --vessel_classes portalvein,venoussystem --workers 2 --split 100/0/0
$PY train_tree_model.py --data "$WORK/data" smoke_trees "$WORK/list" --out "$WORK/tree_model.pth" \
    --iterations 5 --device "$DEVICE"
# the tree network on the device, on a true vessel mask (the 6-step vessel model below may find none)
$PY - "$WORK/tree_model.pth" "$WORK/data/smoke_trees/vol_data" "$DEVICE" <<'EOF'
import sys
from pathlib import Path
import h5py
from evaluation.metrics import wrong_tree_share
from inference.tree_model import load_tree_model
tm = load_tree_model(sys.argv[1], sys.argv[3])
f = sorted(Path(sys.argv[2]).glob("*.h5"))[0]
with h5py.File(f, "r") as h:
    image, classes, spacing = h["image"][:], h["classes"][:], tuple(h.attrs["spacing"])
labels = tm.classify(image, classes > 0, spacing)
print(f"tree model on {next(tm.network.parameters()).device}: {f.name}, {int((classes > 0).sum())} vessel voxels, "
      f"{wrong_tree_share(labels, classes):.1%} in the wrong tree after 5 steps")
EOF
MODEL=$(find "$WORK/ckpt" -path '*smoke_offline*' -name best_model.pth | head -1)
$PY predict.py --model "$MODEL" --input "$WORK/raw/3Dircadb1.1" --output "$WORK/pred" \
    --liver_mask "$WORK/raw/3Dircadb1.1/MASKS_DICOM/liver" --tree_model "$WORK/tree_model.pth" \
    --device "$DEVICE" --mesh --figures
$PY - "$WORK/pred/3Dircadb1.1_stats.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
trees = s["stats"].get("trees", {})
print(f"predict.py on {s['device']}: {s['stats']['vessel_volume_ml']:.2f} mL of vessels, "
      + ", ".join(f"{k} {v['vessel_volume_ml']:.2f} mL" for k, v in trees.items())
      + f"; seconds {s['seconds']}")
EOF

step "done"
find "$WORK/ckpt" -name '*.pth' | sed "s|$WORK/||" | sort
echo "gpu_smoke.sh: all steps passed"
