"""scripts/lib_runs.sh, the ablation scripts' shared runner: which backbones get 3-D patches,
how many epochs a run may take, and the e2e head it needs (bash, no training)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bash(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """bash ``args`` in ``cwd`` with this interpreter as the scripts' PY and the repository importable."""
    full = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(["bash", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def lib_runs(cwd: Path, command: str, **env: str) -> subprocess.CompletedProcess:
    """``command`` in bash after sourcing lib_runs.sh, in ``cwd`` (where main.py's default
    list folder ``list/`` is looked for)."""
    return bash(["-c", f"set -euo pipefail; source '{REPO}/scripts/lib_runs.sh'; {command}"], cwd, **env)


@pytest.fixture
def slice_list(tmp_path: Path) -> Path:
    """A 2-D training list of 382 slices (the demo phantoms' count): 95 batches of 4."""
    lst = tmp_path / "list" / "phantom" / "slice_train.txt"
    lst.parent.mkdir(parents=True)
    lst.write_text("".join(f"case{i // 40:04d}_slice{i % 40:04d}\n" for i in range(382)))
    return tmp_path


@pytest.mark.parametrize("backbone,iters,want", [
    ("unet", 400, "2 100"),                 # the demo's: 100 epochs, iterations end it
    ("unet", 20000, "2 211"),               # ceil(20000 / 95): ITERS, not 100 epochs (9,500 steps), ends it
    ("unet3d", 20000, "3 323"),             # 250 patches = 62 batches of 4
    ("unet3d_bilinear", 400, "3 100"),      # 3-D by the registry, not by its name
])
def test_dims_and_epochs(slice_list: Path, backbone: str, iters: int, want: str) -> None:
    out = lib_runs(slice_list, f"dims_and_epochs {backbone}", DATASET="phantom", DEMO_DATA="data", ITERS=str(iters))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == want.split()


def test_dims_and_epochs_errors_name_the_problem(tmp_path: Path) -> None:
    out = lib_runs(tmp_path, "dims_and_epochs unet", DATASET="phantom", ITERS="400")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == f"error: {Path('list/phantom/slice_train.txt')}: list file not found"
    out = lib_runs(tmp_path, "dims_and_epochs no_such_net", DATASET="phantom", ITERS="400")
    assert out.returncode != 0 and "no_such_net" in out.stderr and "unet" in out.stderr


@pytest.mark.parametrize("backbone,want", [("unet", "2"), ("unet3d", "3"), ("unet3d_bilinear", "3")])
def test_backbone_dims_from_the_registry(tmp_path: Path, backbone: str, want: str) -> None:
    out = lib_runs(tmp_path, f"backbone_dims {backbone}")  # no data needed
    assert out.returncode == 0 and out.stdout.strip() == want, out.stderr


def test_sim_to_real_refuses_a_3d_backbone_before_any_work(tmp_path: Path) -> None:
    out = bash([str(REPO / "scripts" / "sim_to_real.sh")], tmp_path, BACKBONE="unet3d_bilinear",
               DEMO_DATA=str(tmp_path / "data"), DEMO_CKPT=str(tmp_path / "ckpt"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: sim_to_real.sh trains 2-D backbones; unet3d_bilinear is 3-D"
    assert not (tmp_path / "data").exists() and not (tmp_path / "ckpt").exists()


def test_e2e_without_its_fitted_head_stops_before_training(slice_list: Path) -> None:
    out = lib_runs(slice_list, "train_and_test unet e2e x; echo reached", DATASET="phantom",
                   HEAD=str(slice_list / "missing_head.pth"))
    assert out.returncode == 2
    assert "reached" not in out.stdout
    assert f"there is none at '{slice_list / 'missing_head.pth'}'" in out.stderr


@pytest.mark.parametrize("env,message", [
    ({"SALIENCE": "e2e", "GENERATOR": "fpn"}, "error: SALIENCE=e2e learns the bank head: use GENERATOR=bank"),
    ({"SALIENCE": "maps"}, "error: SALIENCE must be offline, e2e or none"),
])
def test_reproduce_ircadb_refuses_a_salience_it_cannot_run_before_any_work(tmp_path: Path, env: dict, message: str):
    out = bash([str(REPO / "scripts" / "reproduce_ircadb.sh"), str(tmp_path / "src")], tmp_path,
               DATA=str(tmp_path / "data"), CKPT=str(tmp_path / "ckpt"), **env)
    assert out.returncode == 2 and out.stderr.strip() == message
    assert not (tmp_path / "data").exists()


def test_every_script_stops_on_a_failure_inside_a_command_substitution(tmp_path):
    """bash turns errexit off inside $(...) unless inherit_errexit is set: real_curves.sh went on
    with an empty model path after train_real.sh failed, and sim_to_real.sh scored a model that
    main.py --reuse had refused. Every script that sets -e sets it too, and with it a function
    failing inside $(...) in an array append stops the script."""
    scripts = [p for p in sorted((REPO / "scripts").glob("*.sh")) if "set -euo pipefail" in p.read_text()]
    assert len(scripts) >= 10
    for p in scripts:
        lines = p.read_text().splitlines()
        i = lines.index("set -euo pipefail")
        assert lines[i + 1].startswith("shopt -s inherit_errexit"), p.name
    probe = tmp_path / "probe.sh"
    probe.write_text("set -euo pipefail\nshopt -s inherit_errexit\nf() { false; echo made; }\n"
                     "rows=()\nrows+=(\"x=$(f)\")\necho went on\n")
    r = bash([str(probe)], tmp_path)
    assert r.returncode != 0 and "went on" not in r.stdout


@pytest.mark.parametrize("script, env", [
    ("ablation_salience.sh", {"RECORD": "demo_time"}),
    ("ablation_backbones.sh", {"RECORD": "demo_time"}),
    ("sim_to_real.sh", {"RECORD": "demo_time"}),
    ("real_curves.sh", {"RECORD": "real_curves", "AXES": "iterations"}),  # results/real_curves_iterations.json
])
def test_a_taken_record_name_stops_a_script_before_it_trains(script, env, tmp_path):
    r = bash([str(REPO / "scripts" / script)], tmp_path, DEMO_DATA=str(tmp_path / "d"), DEMO_CKPT=str(tmp_path / "c"),
             **env)
    assert r.returncode == 2, r.stderr[-500:]
    assert "exists: records are never overwritten" in r.stderr and "==" not in r.stdout
    assert not (tmp_path / "d").exists() and not (tmp_path / "c").exists()
