"""scripts/gpu_smoke.sh stays runnable while no GPU is lent: its dry run on the CPU goes through
the same command lines (AMP training of unet and unet3d with e2e salience, checkpoints rebuilt,
salience_generation.py, offline training, torchrun, a tree model trained and run, predict.py with
it), so a changed flag breaks here, not on the
first GPU box."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_dry_run_on_the_cpu_passes_every_step():
    env = {**os.environ, "SMOKE_DEVICE": "cpu", "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "gpu_smoke.sh: all steps passed" in out
    for run in ("smoke_unet", "smoke_unet3d", "smoke_offline", "smoke_ddp"):
        assert f"{run}/best_model.pth" in out, run
    assert "finite True" in out and "finite False" not in out
    assert "tree model on cpu: case0001.h5" in out and "predict.py on cpu:" in out
