"""scripts/thick_copies.py: thick-slice copies of the training cases, with their own-grid salience."""
from __future__ import annotations

import numpy as np
import pytest

from networks.salience import AnalyticGenerator, salience_3d
from preprocessing.thickness import thicken
from scripts.thick_copies import build_thick_copies, main, thick_name
from utils.h5io import DatasetPaths, parse_slice_name, read_list, read_salience, read_volume


def test_thick_copies_of_the_training_cases(tiny_dataset, tmp_path, one_thread):
    ds = tiny_dataset
    out = DatasetPaths.of(tmp_path / "out", ds.dataset, tmp_path / "lists")
    names = build_thick_copies(ds.paths, out, [2, 3], "analytic", None)
    train = ds.splits["train"]
    cases = read_list(out.list_file("vol_train"))
    assert cases == train + [thick_name(c, f) for c in train for f in (2, 3)]
    assert read_list(out.list_file("vol_test")) == ds.splits["test"]
    assert read_list(out.list_file("slice_train")) == names
    # the originals are links; every listed slice exists
    assert out.volume(train[0]).is_symlink() and out.volume(ds.splits["test"][0]).is_symlink()
    assert all(out.slice(n).is_file() for n in names)
    src = read_volume(ds.paths.volume(train[0]))
    for f in (2, 3):
        name = thick_name(train[0], f)
        thick = read_volume(out.volume(name))
        want = thicken(src, f)
        assert thick.image.shape == (32, 32, 12 // f) and thick.spacing[2] == pytest.approx(1.6 * f)
        np.testing.assert_array_equal(thick.label, want.label)
        # the salience is computed on the thick grid, not averaged from the thin one
        np.testing.assert_allclose(read_salience(out.salience(name)), salience_3d(want.image, AnalyticGenerator()),
                                   atol=1e-6)
        per_case = [n for n in names if parse_slice_name(n)[0] == name]
        assert len(per_case) == int(sum(want.liver[:, :, z].any() for z in range(12 // f))) > 0


def test_refusals_leave_nothing_half_written(tiny_dataset, tmp_path, capsys):
    ds = tiny_dataset
    args = ["--root_path", str(ds.root_path), "--dataset", ds.dataset, "--list_dir", str(ds.list_dir),
            "--out_root", str(tmp_path / "out"), "--out_list_dir", str(tmp_path / "lists")]
    assert main(args + ["--generator", "analytic", "--factors", "1"]) == 2
    assert "factors" in capsys.readouterr().err
    assert main(args + ["--weights", str(tmp_path / "missing.pth")]) == 2  # bank without its head
    assert "missing.pth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(args + ["--generator", "analytic"]) == 0
    assert main(args + ["--generator", "analytic"]) == 2  # never over the lists of an earlier run
    assert "exists" in capsys.readouterr().err
