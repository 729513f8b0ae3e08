"""evaluation.liver_errors: where a liver mask errs and the oracle ceilings, on a worked example;
inference.liver.parenchyma_hu, the parenchyma statistics the refinement and the ceilings share."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.liver_errors import liver_errors
from inference.liver import PARENCHYMA_MIN_VOXELS, parenchyma_hu

SPACING = (1.0, 1.0, 2.0)  # one voxel: 2 mm^3


def worked_case():
    """A 20 x 20 x 10 box of liver; the prediction misses its first 4 rows (800 voxels: rows 10-11
    at probability 0.01, rows 12-13 at 0.2; row 10 at 40 HU, 6 deviations off the parenchyma's
    100 +- 10) and adds a 1-voxel layer beside it (160 voxels, 1 mm from the liver) and an
    8 x 8 x 5 blob (320 voxels) 9.9 mm or more away, 48 of them deeper than 2 mm in it."""
    shape = (50, 50, 20)
    target = np.zeros(shape, bool)
    target[10:30, 10:30, 5:15] = True
    pred = target.copy()
    pred[10:14] = False
    pred[14:30, 30, 5:15] = True
    pred[36:44, 36:44, 5:10] = True
    prob = np.where(pred, 0.9, 0.0).astype(np.float32)
    prob[10:12, 10:30, 5:15] = 0.01
    prob[12:14, 10:30, 5:15] = 0.2
    hu = np.full(shape, 100.0, dtype=np.float32)
    hu[10, 10:30, 5:15] = 40.0
    return pred, target, prob, hu


def test_liver_errors_worked_answer():
    pred, target, prob, hu = worked_case()
    r = liver_errors(pred, target, prob, hu, SPACING, (100.0, 10.0))
    # TP 3200, FP 160 + 320, FN 800
    assert r["dice"] == pytest.approx(6400 / (6400 + 480 + 800))
    assert r["fn_ml"] == pytest.approx(800 * 0.002) and r["fp_ml"] == pytest.approx(480 * 0.002)
    assert r["fp_near_share"] == pytest.approx(160 / 480)
    assert r["fn_median_prob"] == pytest.approx((0.01 + 0.2) / 2)
    assert r["fn_confident_share"] == pytest.approx(0.5)
    assert r["fn_median_z"] == pytest.approx(0.0) and r["fn_atypical_share"] == pytest.approx(0.25)
    assert r["largest_miss_ml"] == pytest.approx(1.6) and r["largest_miss_slices"] == [5, 14]
    c = r["ceilings"]
    # rows 12-13 added: FN 400 left, the FP kept
    assert c["threshold"] == pytest.approx(7200 / (7200 + 480 + 400))
    # within 2 mm of the predicted surface: rows 12-13 (1 and 2 mm out), the layer (1 mm deep) and
    # the blob's outer voxels; rows 10-11 (3 and 4 mm out) stay missed, the blob's 4 x 4 x 3 core extra
    assert c["surface"] == pytest.approx(7200 / (7200 + 48 + 400))
    # rows 11-13 are within 2 deviations: only row 10 stays missed
    assert c["intensity"] == pytest.approx(7600 / (7600 + 480 + 200))
    assert c["largest_miss"] == pytest.approx(8000 / (8000 + 480))


def test_liver_errors_without_parenchyma_empty_masks_and_bad_shapes():
    pred, target, prob, hu = worked_case()
    r = liver_errors(pred, target, prob, hu, SPACING, None)
    assert r["fn_median_z"] is None and r["fn_atypical_share"] is None and r["ceilings"]["intensity"] is None
    assert r["ceilings"]["threshold"] == pytest.approx(7200 / (7200 + 480 + 400))
    empty = liver_errors(np.zeros_like(pred), target, np.zeros_like(prob), hu, SPACING, None)
    assert empty["dice"] == 0.0 and empty["fn_ml"] == pytest.approx(4000 * 0.002) and empty["fp_near_share"] is None
    assert empty["ceilings"]["largest_miss"] == pytest.approx(1.0)
    assert empty["ceilings"]["surface"] == pytest.approx(0.0)  # no predicted surface to move
    none = liver_errors(np.zeros_like(pred), np.zeros_like(pred), prob, hu, SPACING, None)
    assert none["fn_ml"] == 0.0 and none["ceilings"] == {}
    with pytest.raises(ValueError, match="one shape"):
        liver_errors(pred, target[:-1], prob, hu, SPACING, None)
    with pytest.raises(ValueError, match="three positive"):
        liver_errors(pred, target, prob, hu, (1.0, 1.0), None)


def test_parenchyma_hu_is_the_deep_confident_voxels_median_and_robust_spread():
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    liver = np.zeros(shape, bool)
    liver[5:35, 5:35, 5:35] = True
    hu = rng.normal(100.0, 10.0, shape).astype(np.float32)
    hu[5:7] = 500.0  # a surface layer (within 5 mm) that must not count
    prob = np.where(liver, 0.95, 0.0).astype(np.float32)
    prob[20:35] = np.where(liver[20:35], 0.5, 0.0)  # not confident: not counted either
    hu[20:35] = -300.0
    median, sd = parenchyma_hu(liver, prob, hu, (1.0, 1.0, 1.0))
    assert median == pytest.approx(100.0, abs=0.5) and sd == pytest.approx(10.0, rel=0.05)
    # fewer reference voxels than needed: None
    small = np.zeros(shape, bool)
    small[10:22, 10:22, 10:22] = True  # 2 x 2 x 2 deeper than 5 mm
    assert int(np.count_nonzero(small)) > PARENCHYMA_MIN_VOXELS
    assert parenchyma_hu(small, np.where(small, 0.95, 0.0), hu, (1.0, 1.0, 1.0)) is None
    with pytest.raises(ValueError, match="one shape"):
        parenchyma_hu(liver, prob[:-1], hu, (1.0, 1.0, 1.0))


def test_liver_benches_pair_each_real_patient_with_its_model(tmp_path):
    """bench/liver_bench.py and bench/liver_errors.py measure the patient folders that --liver_model
    N=FILE names, in name order; a folder without a model, a file and a malformed item are not."""
    from bench.liver_bench import patients_with_models
    for name in ("3Dircadb1.1", "3Dircadb1.7", "3Dircadb1.9"):
        (tmp_path / name).mkdir()
    (tmp_path / "3Dircadb1.2").write_text("not a folder")
    got = patients_with_models(str(tmp_path), ["7=b.pth", "1=a.pth", "2=c.pth"])
    assert got == {tmp_path / "3Dircadb1.1": "a.pth", tmp_path / "3Dircadb1.7": "b.pth"}
    assert list(got) == [tmp_path / "3Dircadb1.1", tmp_path / "3Dircadb1.7"]
    with pytest.raises(ValueError, match="N=FILE"):
        patients_with_models(str(tmp_path), ["a.pth"])


def test_a_liver_bench_without_a_patient_to_measure_says_so(tmp_path, capsys):
    import argparse

    import torch

    from bench.liver_bench import start_real_patients
    (tmp_path / "3Dircadb1.1").mkdir()
    args = argparse.Namespace(real=str(tmp_path), liver_model=["7=b.pth"], threads=torch.get_num_threads())
    assert start_real_patients(args) == {}
    assert "no real 3D-IRCADb patient with a liver model; nothing measured" in capsys.readouterr().out
    args.liver_model = ["1=a.pth"]
    assert start_real_patients(args) == {tmp_path / "3Dircadb1.1": "a.pth"}
    assert capsys.readouterr().out == ""
