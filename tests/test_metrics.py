"""Metrics (evaluation/metrics.py): agreement with medpy and worked answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
from medpy.metric import binary as mb
from scipy import ndimage
from scipy.spatial import cKDTree

from evaluation import metrics as M

SPACING = (0.7, 0.9, 2.5)


def _blobs(seed: int, shape=(36, 30, 18), thr=0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > thr


def _grid_mm(shape, spacing):
    return np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")


def _ball(shape, spacing, centre_mm, radius_mm):
    r, c, s = _grid_mm(shape, spacing)
    return (r - centre_mm[0]) ** 2 + (c - centre_mm[1]) ** 2 + (s - centre_mm[2]) ** 2 <= radius_mm**2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_medpy_on_random_blobs(seed):
    pred, target = _blobs(seed), _blobs(seed + 100, thr=0.08)
    assert pred.any() and target.any()
    assert M.dice(pred, target) == pytest.approx(mb.dc(pred, target), abs=1e-12)
    assert M.sensitivity(pred, target) == pytest.approx(mb.sensitivity(pred, target), abs=1e-12)
    assert M.specificity(pred, target) == pytest.approx(mb.specificity(pred, target), abs=1e-12)
    assert M.precision(pred, target) == pytest.approx(mb.precision(pred, target), abs=1e-12)
    assert M.hd95(pred, target, SPACING) == pytest.approx(mb.hd95(pred, target, voxelspacing=SPACING), abs=1e-9)
    assert M.assd(pred, target, SPACING) == pytest.approx(mb.assd(pred, target, voxelspacing=SPACING), abs=1e-9)
    case = M.evaluate_case(pred, target, SPACING)
    assert case["hd95_mm"] == pytest.approx(mb.hd95(pred, target, voxelspacing=SPACING), abs=1e-9)
    assert case["iou"] == pytest.approx(mb.jc(pred, target), abs=1e-12)


def test_cropping_does_not_change_distances_near_the_border():
    """Objects touching the array edge: the edge counts as background for the erosion, as in medpy."""
    pred = np.zeros((20, 20, 10), bool)
    target = np.zeros_like(pred)
    pred[0:6, 3:9, 0:4] = True
    target[2:9, 5:12, 1:10] = True
    assert M.hd95(pred, target, SPACING) == pytest.approx(mb.hd95(pred, target, voxelspacing=SPACING), abs=1e-9)
    assert M.assd(pred, target, SPACING) == pytest.approx(mb.assd(pred, target, voxelspacing=SPACING), abs=1e-9)


def test_surface_distances_match_brute_force():
    pred, target = _blobs(5, shape=(24, 20, 12)), _blobs(6, shape=(24, 20, 12), thr=0.1)
    d_pt, _ = M.surface_distances(pred, target, SPACING)
    surf = lambda m: m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1))  # noqa: E731
    pts_p = np.argwhere(surf(pred)) * np.asarray(SPACING)
    pts_t = np.argwhere(surf(target)) * np.asarray(SPACING)
    ref, _ = cKDTree(pts_t).query(pts_p)
    np.testing.assert_allclose(np.sort(d_pt), np.sort(ref), atol=1e-9)


def test_concentric_spheres_distance_is_radius_difference():
    spacing = (0.5, 0.5, 1.0)
    shape = (60, 60, 30)
    centre = (15.0, 15.0, 15.0)
    r1, r2 = 5.0, 11.0
    small, big = _ball(shape, spacing, centre, r1), _ball(shape, spacing, centre, r2)
    # surface voxels sit within one voxel of the true spheres, so the answer holds to max(spacing)
    assert M.hd95(small, big, spacing) == pytest.approx(r2 - r1, abs=max(spacing))
    assert M.assd(small, big, spacing) == pytest.approx(r2 - r1, abs=max(spacing))
    assert M.dice(small, big) == pytest.approx(2 * r1**3 / (r1**3 + r2**3), rel=0.05)


def test_tube_shifted_along_its_axis():
    """A tube of L slices shifted by k slices: Dice (L-k)/L, IoU (L-k)/(L+k), max surface distance k*dz."""
    shape, (L, k) = (16, 16, 30), (18, 3)
    r, c = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    disc = (r - 8) ** 2 + (c - 8) ** 2 <= 2**2
    target = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    target[:, :, 4:4 + L] = disc[:, :, None]
    pred[:, :, 4 + k:4 + k + L] = disc[:, :, None]
    assert M.dice(pred, target) == pytest.approx((L - k) / L)
    assert M.iou(pred, target) == pytest.approx((L - k) / (L + k))
    assert M.sensitivity(pred, target) == pytest.approx((L - k) / L)
    d_pt, d_tp = M.surface_distances(pred, target, SPACING)
    # disc radius 2 voxels * 0.9 mm < k * 2.5 mm, so the end caps give the largest distance
    assert max(d_pt.max(), d_tp.max()) == pytest.approx(k * SPACING[2])


def test_tube_shifted_across_its_axis_centreline():
    """Shift a radius-3 tube sideways by 1 voxel: centreline still inside; by 5 voxels: entirely outside."""
    shape = (24, 24, 20)
    r, c = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
    tube = lambda cr: np.repeat((((r - cr) ** 2 + (c - 12) ** 2) <= 9)[:, :, None], 20, axis=2)  # noqa: E731
    target = tube(10)
    near = M.evaluate_case(tube(11), target, (1.0, 1.0, 1.0))
    far = M.evaluate_case(tube(17), target, (1.0, 1.0, 1.0))
    assert near["cldice"] == pytest.approx(1.0)
    assert far["cldice"] == 0.0 and far["dice"] == 0.0
    assert far["hd95_mm"] >= 5.0 - 1e-9


def test_cldice_self_and_broken_tube():
    shape = (20, 20, 40)
    r, c = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    tube = np.repeat(((r - 10) ** 2 + (c - 10) ** 2 <= 4)[:, :, None], 40, axis=2)
    tube[:, :, :3] = tube[:, :, -3:] = False
    assert M.cldice(tube, tube) == pytest.approx(1.0)
    broken = tube.copy()
    broken[:, :, 18:24] = False
    value = M.cldice(broken, tube)
    assert value < 1.0
    # the broken tube's skeleton lies inside the tube (Tprec = 1); Tsens is the covered centreline fraction
    sk = M.skeleton(tube)
    tsens = np.count_nonzero(sk & broken) / sk.sum()
    assert value == pytest.approx(2 * tsens / (1 + tsens))
    assert M.dice(broken, tube) > value - 0.2  # Dice barely notices a gap that clDice penalises
    assert M.n_components(broken) == 2 and M.n_components(tube) == 1


def _tree(spacing):
    """A trunk (radius 3.6 mm) along D, a medium branch (1.4 mm) along rows, a thin one (0.6 mm) along columns."""
    shape = (64, 64, 48)
    r, c, s = _grid_mm(shape, spacing)
    trunk = (r - 16) ** 2 + (c - 16) ** 2 <= 3.6**2
    medium = ((c - 16) ** 2 + (s - 8) ** 2 <= 1.4**2) & (r >= 16)
    thin = ((r - 16) ** 2 + (s - 16) ** 2 <= 0.6**2) & (c >= 16)
    return trunk, medium, thin


def test_centreline_recall_drops_only_in_thin_branch_bin():
    spacing = (0.5, 0.5, 0.5)
    trunk, medium, thin = _tree(spacing)
    target = trunk | medium | thin
    # delete the thin branch from 2 mm past the trunk's wall onwards
    _, c, _ = _grid_mm(target.shape, spacing)
    deleted = thin & ~trunk & (c >= 16 + 3.6 + 2.0)
    pred = target & ~deleted
    full = M.centreline_recall_by_radius(target, target, spacing)
    part = M.centreline_recall_by_radius(pred, target, spacing)
    for name in M.RADIUS_BIN_NAMES:
        assert full[f"cl_n_{name}"] > 0, name
        assert full[f"cl_recall_{name}"] == 1.0
    assert part["cl_recall_lt1"] < 0.6
    for name in ("1to2", "2to3", "ge3"):
        assert part[f"cl_recall_{name}"] == 1.0, name
    # the loss equals the deleted share of the thin-bin centreline
    sk = M.skeleton(target)
    edt = ndimage.distance_transform_edt(target, sampling=spacing)
    thin_cl = sk & (edt < 1.0)
    assert part["cl_recall_lt1"] == pytest.approx(1 - np.count_nonzero(thin_cl & deleted) / thin_cl.sum())


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (0.57, 0.57, 1.6), (1.0, 0.7, 2.5)])
def test_distance_to_background_equals_the_capped_edt(spacing):
    rng = np.random.default_rng(4)
    mask = ndimage.binary_dilation(rng.random((30, 26, 14)) < 0.03, iterations=3)
    mask[:, :, :8] = True  # foreground touching the array's border: outside is not background
    points = np.nonzero(mask)
    for cap in (1.0, 3.0):
        ref = np.minimum(ndimage.distance_transform_edt(mask, sampling=spacing)[points], cap)
        got = M.distance_to_background(mask, points, spacing, cap=cap)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
        assert (got < cap).any() and (got == cap).any()


def test_empty_masks_give_documented_values():
    spacing = (1.0, 1.0, 2.0)
    target = np.zeros((10, 10, 6), bool)
    target[3:6, 3:6, 1:5] = True
    empty = np.zeros_like(target)
    e = M.evaluate_case(empty, target, spacing)
    assert e["dice"] == 0.0 and e["sensitivity"] == 0.0 and e["cldice"] == 0.0
    assert math.isnan(e["precision"]) and math.isnan(e["hd95_mm"]) and math.isnan(e["assd_mm"])
    assert e["empty_pred"] == 1 and e["empty_true"] == 0 and e["components_ratio"] == 0.0
    e = M.evaluate_case(target, empty, spacing)
    assert math.isnan(e["sensitivity"]) and math.isnan(e["components_ratio"]) and e["precision"] == 0.0
    assert all(math.isnan(e[f"cl_recall_{n}"]) for n in M.RADIUS_BIN_NAMES)
    e = M.evaluate_case(empty, empty, spacing)
    assert math.isnan(e["dice"]) and math.isnan(e["cldice"]) and e["specificity"] == 1.0
    assert math.isnan(M.hd95(empty, target, spacing)) and math.isnan(M.assd(target, empty, spacing))


def test_roi_restricts_both_masks_and_negatives():
    target = np.zeros((10, 10, 4), bool)
    pred = np.zeros_like(target)
    target[2:4, 2:4] = True          # 16 voxels inside the ROI
    pred[2:4, 2:5] = True            # 8 false positives inside the ROI
    pred[8:10, 8:10] = True          # 16 false positives outside the ROI
    roi = np.zeros_like(target)
    roi[0:6, 0:6] = True             # 144 voxels
    e = M.evaluate_case(pred, target, (1, 1, 1), roi=roi)
    assert e["dice"] == pytest.approx(2 * 16 / (24 + 16))
    assert e["specificity"] == pytest.approx((144 - 16 - 8) / (144 - 16))
    assert e["components_pred"] == 1
    assert M.specificity(pred, target) == pytest.approx((400 - 16 - 24) / (400 - 16))


def test_components_use_26_connectivity_and_bad_input():
    m = np.zeros((5, 5, 5), bool)
    m[1, 1, 1] = m[2, 2, 2] = True   # corner neighbours: one component in 26-connectivity
    m[4, 0, 4] = True
    assert M.n_components(m) == 2
    with pytest.raises(ValueError, match="differs"):
        M.dice(m, m[:4])
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(m, m, (1.0, 1.0))


def test_evaluate_case_equals_the_single_metric_functions_with_roi():
    pred, target = _blobs(10), _blobs(11)
    roi = np.zeros(pred.shape, bool)
    roi[3:30, 2:27, 1:16] = True
    got = M.evaluate_case(pred, target, SPACING, roi=roi)
    p, t = pred & roi, target & roi
    want = {"dice": M.dice(p, t), "cldice": M.cldice(p, t), "iou": M.iou(p, t), "sensitivity": M.sensitivity(p, t),
            "specificity": M.specificity(p, t, roi), "precision": M.precision(p, t), "hd95_mm": M.hd95(p, t, SPACING),
            "assd_mm": M.assd(p, t, SPACING), **M.centreline_recall_by_radius(p, t, SPACING),
            "components_pred": M.n_components(p), "components_true": M.n_components(t)}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, nan_ok=True), k
    # specificity counts negatives inside the ROI only: a different number than on the whole array
    assert got["specificity"] != pytest.approx(M.specificity(p, t))
    with pytest.raises(ValueError, match="roi shape"):
        M.evaluate_case(pred, target, SPACING, roi=roi[1:])


def test_skeleton_neighbours_worked_example():
    from evaluation.metrics import skeleton_neighbours

    skel = np.zeros((7, 7, 3), bool)
    skel[1:6, 3, 1] = True  # a line of five: ends 1, inside 2
    skel[3, 4:6, 1] = True  # a side branch from its middle: a junction there
    skel[0, 0, 0] = True  # a lone voxel
    n = skeleton_neighbours(skel)
    assert n[0, 0, 0] == 0 and n[1, 3, 1] == 1 and n[5, 3, 1] == 1 and n[3, 5, 1] == 1
    assert n[3, 3, 1] >= 3 and n[3, 2, 1] == 0  # off the skeleton: 0
