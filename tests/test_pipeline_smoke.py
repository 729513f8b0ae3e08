"""The whole pipeline at tiny sizes, through the command lines a user types.

phantom (DICOM) -> preprocess.py -> salience_generation.py (shipped bank head) ->
main.py (2 iterations, offline salience) -> test.py -> reports with finite metrics.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import pytest

import main as main_cli
import make_phantoms
import preprocess
import salience_generation
import test as test_cli
from evaluation.compare import compare_table
from scripts.draw_method_figure import draw_method_figure
from utils.h5io import DatasetPaths, read_list


@pytest.mark.parametrize("backbone,salience", [("unet", "offline"), ("unet3d", "e2e")])
def test_phantom_to_metrics(tmp_path: Path, backbone: str, salience: str) -> None:
    raw, data, lists, ckpt = tmp_path / "raw", tmp_path / "data", tmp_path / "list", tmp_path / "ckpt"
    common = ["--dataset", "phantom", "--root_path", str(data), "--list_dir", str(lists)]

    assert make_phantoms.main(["--out", str(raw), "--cases", "5", "--preset", "tiny", "--seed", "7"]) == 0
    assert preprocess.main(common + ["--src", str(raw)]) == 0
    paths = DatasetPaths.of(data, "phantom", lists)
    cases = [c for split in ("train", "val", "test") for c in read_list(paths.list_file(f"vol_{split}"))]
    assert len(cases) == 5 and len(read_list(paths.list_file("vol_test"))) >= 1

    assert salience_generation.main(common + ["--generator", "bank"]) == 0
    for case in cases:
        with h5py.File(paths.salience(case), "r") as f:
            s = f["salience"][()]
            assert s.shape[0] == 3 and s.min() >= 0.0 and s.max() == pytest.approx(1.0)

    train_args = common + ["--backbone", backbone, "--salience", salience, "--output_root", str(ckpt),
                           "--max_iterations", "2", "--batch_size", "2", "--num_workers", "0", "--exp", "smoke"]
    if backbone == "unet":
        train_args += ["--model_kwargs", '{"base_channels": 4}', "--img_size", "64", "64"]
    else:
        train_args += ["--model_kwargs", '{"base_channels": 4}', "--patch_size", "32", "32", "16"]
    assert main_cli.main(train_args) == 0
    best = next(ckpt.rglob("best_model.pth"))
    assert (best.parent / "config.json").is_file() and (best.parent / "last.pth").is_file()

    out = tmp_path / "eval"
    assert test_cli.main(common + ["--backbone", backbone, "--model_path", str(best), "--output", str(out),
                                   "--eval_roi", "liver"]) == 0
    for name in ("per_case.csv", "summary.json", "results.md"):
        assert (out / name).is_file(), name
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == read_list(paths.list_file("vol_test"))
    for r in rows:
        # overlap metrics of a 2-iteration model are poor but must be numbers in [0, 1]
        assert 0.0 <= float(r["specificity"]) <= 1.0
        assert float(r["components_true"]) >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["metrics"]["specificity"]["mean"])

    # the ablation table reads the same report; the README figure draws from the same run
    table = compare_table([(salience, out)])
    mean_dice = summary["metrics"]["dice"]["mean"]
    assert f"| {salience} | {len(rows)} |" in table
    assert (f"{mean_dice:.3f}" in table) if math.isfinite(mean_dice) else ("n/a" in table)
    fig = draw_method_figure(best, tmp_path / "fig.png", "phantom", str(data), str(lists))
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="per_case.csv"):
        compare_table([("missing", tmp_path / "nowhere")])
