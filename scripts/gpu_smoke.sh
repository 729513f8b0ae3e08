#!/usr/bin/env bash
# GPU smoke test, a few minutes on one GPU: AMP training steps for unet and unet3d with
# e2e salience, e2e salience generation, and torchrun with one process. Tiny synthetic
# data in the project's HDF5 layout (the tests' tiny_dataset, 5 cases of 32 x 32 x 12),
# written to a temporary folder. Prints what it did; exits non-zero on the first failure.
#
#   bash scripts/gpu_smoke.sh                     # from the repository root
#   SMOKE_DEVICE=cpu bash scripts/gpu_smoke.sh    # dry run of the same steps on the CPU (no AMP)
set -euo pipefail
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

step "done"
find "$WORK/ckpt" -name '*.pth' | sed "s|$WORK/||" | sort
echo "gpu_smoke.sh: all steps passed"
