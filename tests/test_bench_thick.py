"""bench/thick_slices.py: the thick copies, the slice interpolation, and the four variants' data."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench.thick_slices import VARIANTS, main, run, table
from preprocessing.thickness import group_mean, interpolate_slices, thicken
from networks.checkpoint import generator_record, save_checkpoint
from networks.e2e import build_segmenter
from tests.conftest import tiny_volume
from utils.h5io import DatasetPaths, read_salience, read_volume

KW = {"base_channels": 4, "depth": 2}


def test_group_mean_averages_consecutive_slices_and_drops_the_rest():
    a = np.arange(2 * 7, dtype=np.float32).reshape(2, 1, 7)
    g = group_mean(a, 3)
    assert g.shape == (2, 1, 2)
    np.testing.assert_array_equal(g[0, 0], [1.0, 4.0])  # (0+1+2)/3, (3+4+5)/3; slice 6 dropped
    np.testing.assert_array_equal(group_mean(a, 1), a)
    with pytest.raises(ValueError):
        group_mean(a, 8)


def test_thicken_keeps_a_label_half_present_in_its_group():
    vol = tiny_volume(0)
    label = np.zeros_like(vol.label)
    label[5, 5, 0] = 1  # one of the pair (0, 1): kept
    label[6, 6, 2:4] = 1  # both of (2, 3): kept
    label[7, 7, 4] = 1
    label[7, 7, 5] = 0
    thick = thicken(dataclasses.replace(vol, label=label), 2)
    assert thick.image.shape == (32, 32, 6) and thick.spacing == (0.8, 0.8, 3.2) and thick.crop is None
    assert thick.label[5, 5, 0] == 1 and thick.label[6, 6, 1] == 1 and thick.label[7, 7, 2] == 1
    assert thick.label.sum() == 3
    np.testing.assert_allclose(thick.image[:, :, 1], vol.image[:, :, 2:4].mean(-1), rtol=1e-6)


def test_interpolated_slices_average_back_to_the_thick_ones():
    d, f = 6, 2
    z = np.arange(d, dtype=np.float32)
    linear = np.broadcast_to(3.0 + 0.5 * z, (4, 5, d)).copy()
    fine = interpolate_slices(linear, f)
    assert fine.shape == (4, 5, d * f)
    # interior groups come back exactly; thin slices sit at j -/+ 0.25
    np.testing.assert_allclose(group_mean(fine, f)[..., 1:-1], linear[..., 1:-1], rtol=1e-6)
    np.testing.assert_allclose(fine[0, 0, 2:4], [3.0 + 0.5 * 0.75, 3.0 + 0.5 * 1.25], rtol=1e-6)
    const = np.full((3, 3, 4), 0.7, np.float32)
    np.testing.assert_allclose(group_mean(interpolate_slices(const, 3), 3), const, rtol=1e-6)


@pytest.fixture
def offline_model(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter("unet", "offline", 1, KW).eval()
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, model_name="unet", model_kwargs=KW, salience="offline", config={}, epoch=1,
                    iteration=1, best_metric=0.0, img_size=[32, 32], generator=generator_record("analytic"))
    return path


def test_factor_one_makes_four_identical_variants(tiny_dataset, offline_model, tmp_path, one_thread):
    ds = tiny_dataset
    work = tmp_path / "work"
    res = run(offline_model, ds.root_path, ds.dataset, ds.list_dir, "test", 1, work, None, "cpu")
    assert list(res) == list(VARIANTS)
    case = ds.splits["test"][0]
    sal = [read_salience(DatasetPaths.of(work / f"variant{i}", ds.dataset).salience(case)) for i in range(4)]
    for s in sal[1:]:
        np.testing.assert_allclose(s, sal[0], atol=1e-6)
    dice = {v: rows[0]["dice"] for v, rows in res.items()}
    assert len(set(dice.values())) == 1
    assert table(res).count("\n") == 1 + len(VARIANTS)


def test_factor_two_scores_the_thick_copy(tiny_dataset, offline_model, tmp_path, one_thread):
    ds = tiny_dataset
    work = tmp_path / "work"
    res = run(offline_model, ds.root_path, ds.dataset, ds.list_dir, "test", 2, work, None, "cpu")
    case = ds.splits["test"][0]
    thick = thicken(read_volume(ds.paths.volume(case)), 2)
    inside = int((thick.label.astype(bool) & thick.liver.astype(bool)).sum())
    assert [rows[0]["voxels_true"] for rows in res.values()][1:] == [inside] * 3
    sal = [read_salience(DatasetPaths.of(work / f"variant{i}", ds.dataset).salience(case)) for i in range(4)]
    assert sal[0].shape[-1] == 12 and all(s.shape[-1] == 6 for s in sal[1:])
    np.testing.assert_allclose(sal[3], group_mean(sal[0], 2), atol=1e-6)  # the oracle: the fine maps averaged
    assert not np.allclose(sal[1], sal[2])  # the thick grid's maps differ from the interpolated grid's
    with pytest.raises(ValueError, match="not empty"):  # a second run would overwrite the first
        run(offline_model, ds.root_path, ds.dataset, ds.list_dir, "test", 2, work, None, "cpu")


def test_a_model_without_offline_salience_is_refused(tiny_dataset, tmp_path, capsys):
    ds = tiny_dataset
    model = build_segmenter("unet", "none", 1, KW)
    path = tmp_path / "none.pth"
    save_checkpoint(path, model, model_name="unet", model_kwargs=KW, salience="none", config={}, epoch=1,
                    iteration=1, best_metric=0.0, img_size=[32, 32])
    rc = main(["--model", str(path), "--root_path", str(ds.root_path), "--dataset", ds.dataset,
               "--list_dir", str(ds.list_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(path) in err[0] and "'none'" in err[0]
