"""Vessel segmentation metrics (docs/DESIGN.md section 4), pure functions on boolean arrays.

Arrays are (H, W, D) = (rows, columns, slices), argument order (pred, target); spacing is
(row, col, slice) in mm. Overlap metrics do not depend on spacing and do not take it.

Empty masks (documented values, never an exception):

- A ratio whose denominator is 0 is NaN: Dice and IoU when both masks are empty,
  sensitivity when the truth is empty, precision when the prediction is empty,
  specificity when there is no negative voxel, the component ratio when the truth is empty,
  centreline recall for a radius bin with no truth-centreline voxel.
- clDice is NaN when both skeletons are empty and 0 when exactly one is.
- HD95 and ASSD are NaN when either mask is empty.

Surface distances follow ``medpy.metric.binary.hd95`` / ``assd`` exactly (surface = mask
minus its erosion with the 6-connected cross, distances from the EDT of the other
surface's complement with ``sampling=spacing``; HD95 is the 95th percentile of both
directed sets pooled, ASSD the mean of the same pooled set, as medpy 0.5 computes it; older
medpy versions averaged the two directed means instead), computed on the union
bounding box plus a 1-voxel margin: the erosion treats the outside as background either
way and every surface voxel lies inside the box, so the result is identical and a
512 x 512 x 120 volume is cheap.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from utils.boxes import bounding_box

RADIUS_BINS_MM: tuple[tuple[float, float], ...] = ((0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, float("inf")))
RADIUS_BIN_NAMES: tuple[str, ...] = ("lt1", "1to2", "2to3", "ge3")
_NAN = float("nan")


def _as_bool(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be (H, W) or (H, W, D), got shape {pred.shape}")
    return pred.astype(bool, copy=False), target.astype(bool, copy=False)


def _spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.size != ndim or np.any(s <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm), got {tuple(spacing)}")
    return s


def _roi(roi: Optional[np.ndarray], shape: tuple[int, ...]) -> Optional[np.ndarray]:
    """The one ROI check: None, or a boolean mask of ``shape``."""
    if roi is None:
        return None
    roi = np.asarray(roi, dtype=bool)
    if roi.shape != shape:
        raise ValueError(f"roi shape {roi.shape} differs from mask shape {shape}")
    return roi


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else _NAN


# ---------------------------------------------------------------- overlap
def confusion(pred: np.ndarray, target: np.ndarray, roi: Optional[np.ndarray] = None) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) voxel counts; with ``roi`` only voxels inside it count."""
    pred, target = _as_bool(pred, target)
    roi = _roi(roi, pred.shape)
    if roi is not None:
        pred, target = pred & roi, target & roi
        n = int(roi.sum())
    else:
        n = pred.size
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(target)) - tp
    return tp, fp, fn, n - tp - fp - fn


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """2 |P & T| / (|P| + |T|); NaN if both are empty."""
    tp, fp, fn, _ = confusion(pred, target)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """|P & T| / |P | T|; NaN if both are empty."""
    tp, fp, fn, _ = confusion(pred, target)
    return _ratio(tp, tp + fp + fn)


def sensitivity(pred: np.ndarray, target: np.ndarray) -> float:
    """TP / (TP + FN) (recall); NaN if the truth is empty."""
    tp, _, fn, _ = confusion(pred, target)
    return _ratio(tp, tp + fn)


def specificity(pred: np.ndarray, target: np.ndarray, roi: Optional[np.ndarray] = None) -> float:
    """TN / (TN + FP), negatives counted inside ``roi`` (whole array if None); NaN if no negative."""
    _, fp, _, tn = confusion(pred, target, roi)
    return _ratio(tn, tn + fp)


def precision(pred: np.ndarray, target: np.ndarray) -> float:
    """TP / (TP + FP); NaN if the prediction is empty."""
    tp, fp, _, _ = confusion(pred, target)
    return _ratio(tp, tp + fp)


# ---------------------------------------------------------------- skeletons
def skeleton(mask: np.ndarray) -> np.ndarray:
    """Hard skeleton (skimage ``skeletonize``: Lee's method in 3-D), computed on the mask's bounding box."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    box = bounding_box(mask, margin=1)
    if box is not None:
        out[box] = skeletonize(mask[box])
    return out


def skeleton_neighbours(skel: np.ndarray) -> np.ndarray:
    """int (H, W, D): for each voxel of the bool skeleton ``skel``, how many of its 26 neighbours are
    skeleton voxels (0 elsewhere): 0 a lone voxel, 1 an end, 2 along a branch, 3 or more a junction."""
    skel = np.asarray(skel, dtype=bool)
    count = ndimage.convolve(skel.astype(np.uint8), np.ones((3, 3, 3), np.uint8), mode="constant") - 1
    return np.where(skel, count, 0)


def cldice(pred: np.ndarray, target: np.ndarray, *, pred_skeleton: Optional[np.ndarray] = None,
           target_skeleton: Optional[np.ndarray] = None) -> float:
    """Centreline Dice (Shit et al. 2021) with hard skeletons.

    Tprec = |S(P) & T| / |S(P)|, Tsens = |S(T) & P| / |S(T)|, clDice = 2 Tprec Tsens / (Tprec + Tsens).
    Precomputed skeletons may be passed to avoid recomputing them.
    """
    pred, target = _as_bool(pred, target)
    sp = skeleton(pred) if pred_skeleton is None else pred_skeleton
    st = skeleton(target) if target_skeleton is None else target_skeleton
    n_sp, n_st = int(sp.sum()), int(st.sum())
    if n_sp == 0 and n_st == 0:
        return _NAN
    if n_sp == 0 or n_st == 0:
        return 0.0
    tprec = np.count_nonzero(sp & target) / n_sp
    tsens = np.count_nonzero(st & pred) / n_st
    return 0.0 if tprec + tsens == 0 else float(2 * tprec * tsens / (tprec + tsens))


def distance_to_background(mask: np.ndarray, points: tuple[np.ndarray, ...], spacing: Sequence[float],
                           cap: float) -> np.ndarray:
    """Distance in mm from each voxel of ``points`` (index arrays, as ``np.nonzero`` gives) to
    the nearest background voxel centre of ``mask``, capped at ``cap``: min(distance, cap).

    Equal to ``ndimage.distance_transform_edt(mask, sampling=spacing)[points]`` below
    ``cap`` (background outside the array does not count, as there), but it only visits the
    voxels within ``cap`` of each point, nearest first: on a whole-abdomen mask that is
    about 0.1 s where the full transform takes seconds.
    """
    sp = _spacing(spacing, mask.ndim)
    idx = np.stack([np.asarray(p, dtype=np.int64) for p in points], axis=1)  # (N, ndim)
    radius = np.full(len(idx), float(cap))
    reach = np.floor(cap / sp).astype(int)
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    dist = np.sqrt(((offsets * sp) ** 2).sum(axis=1))
    keep = (dist < cap) & (dist > 0)
    order = np.argsort(dist[keep], kind="stable")
    offsets, dist = offsets[keep][order], dist[keep][order]
    todo = np.arange(len(idx))
    shape = np.asarray(mask.shape)
    for off, d in zip(offsets, dist):
        if todo.size == 0:
            break
        q = idx[todo] + off
        inside = np.all((q >= 0) & (q < shape), axis=1)
        hit = np.zeros(todo.size, dtype=bool)
        hit[inside] = ~mask[tuple(q[inside].T)]
        radius[todo[hit]] = d
        todo = todo[~hit]
    return radius


def centreline_recall_by_radius(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], *, target_skeleton: Optional[np.ndarray] = None
) -> dict[str, float]:
    """Fraction of the truth's centreline covered by ``pred``, per vessel-radius bin.

    Radius at a centreline voxel = the truth's Euclidean distance transform in mm there
    (distance from the voxel centre to the nearest background voxel centre; for a tube of
    radius r sampled at spacing s this is r up to about s/2). Bins (mm): <1, 1-2, 2-3, >=3.
    Returns ``cl_recall_<bin>`` (NaN when the bin has no centreline voxel) and ``cl_n_<bin>``
    (centreline voxels in the bin).
    """
    pred, target = _as_bool(pred, target)
    sp = _spacing(spacing, pred.ndim)
    st = skeleton(target) if target_skeleton is None else target_skeleton
    out: dict[str, float] = {}
    points = np.nonzero(st & target)
    # the bins only need radii below their last finite edge
    radius = distance_to_background(target, points, sp, cap=RADIUS_BINS_MM[-1][0])
    covered = pred[points]
    for (lo, hi), name in zip(RADIUS_BINS_MM, RADIUS_BIN_NAMES):
        sel = (radius >= lo) & (radius < hi)
        n = int(sel.sum())
        out[f"cl_recall_{name}"] = _ratio(np.count_nonzero(covered[sel]), n)
        out[f"cl_n_{name}"] = n
    return out


# ---------------------------------------------------------------- surface distances
def _surface(mask: np.ndarray) -> np.ndarray:
    # medpy's definition: connectivity 1 cross, outside the array counts as background
    footprint = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def surface_distances(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface -> target surface, target -> pred).

    Both masks must be non-empty (raises ValueError otherwise).
    """
    pred, target = _as_bool(pred, target)
    sp = _spacing(spacing, pred.ndim)
    if not pred.any() or not target.any():
        raise ValueError("surface distances need two non-empty masks")
    box = bounding_box(pred | target, margin=1)
    p, t = pred[box], target[box]
    sp_, st_ = _surface(p), _surface(t)
    d_pt = ndimage.distance_transform_edt(~st_, sampling=sp)[sp_]
    d_tp = ndimage.distance_transform_edt(~sp_, sampling=sp)[st_]
    return d_pt, d_tp


def _pooled(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float],
            distances: Optional[tuple[np.ndarray, np.ndarray]]) -> Optional[np.ndarray]:
    """Both directed surface-distance sets pooled (mm), or None if a mask is empty."""
    pred, target = _as_bool(pred, target)
    _spacing(spacing, pred.ndim)
    if not pred.any() or not target.any():
        return None
    d_pt, d_tp = surface_distances(pred, target, spacing) if distances is None else distances
    return np.hstack((d_pt, d_tp))


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], *,
         distances: Optional[tuple[np.ndarray, np.ndarray]] = None) -> float:
    """95th percentile of the pooled symmetric surface distances, mm (medpy's hd95); NaN if a mask is empty.

    ``distances``: precomputed :func:`surface_distances` of the same masks (to avoid recomputing).
    """
    pooled = _pooled(pred, target, spacing, distances)
    return _NAN if pooled is None else float(np.percentile(pooled, 95))


def assd(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], *,
         distances: Optional[tuple[np.ndarray, np.ndarray]] = None) -> float:
    """Average symmetric surface distance, mm: mean of both directed sets pooled (medpy 0.5 assd); NaN if a
    mask is empty. ``distances`` as for :func:`hd95`."""
    pooled = _pooled(pred, target, spacing, distances)
    return _NAN if pooled is None else float(pooled.mean())


# ---------------------------------------------------------------- connectivity
def n_components(mask: np.ndarray) -> int:
    """Connected components with 26-connectivity (8 in 2-D)."""
    mask = np.asarray(mask, dtype=bool)
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    return int(ndimage.label(mask, structure=structure)[1])


# ---------------------------------------------------------------- all of them
METRIC_KEYS: tuple[str, ...] = (
    "dice", "cldice", "iou", "sensitivity", "specificity", "precision", "hd95_mm", "assd_mm",
    *(f"cl_recall_{n}" for n in RADIUS_BIN_NAMES), *(f"cl_n_{n}" for n in RADIUS_BIN_NAMES),
    "components_pred", "components_true", "components_ratio", "voxels_pred", "voxels_true",
    "empty_pred", "empty_true",
)


def wrong_tree_share(pred_labels: np.ndarray, true_labels: np.ndarray, roi: Optional[np.ndarray] = None) -> float:
    """Of the true vessel voxels a model found (both label maps > 0, inside ``roi``), the share it
    gave another tree (labels differ); NaN when it found none. Label maps: (H, W, D) integers,
    0 background, 1, 2, ... the trees, numbered alike in both."""
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"label maps differ in shape: {pred_labels.shape} vs {true_labels.shape}")
    found = (pred_labels > 0) & (true_labels > 0)
    roi = _roi(roi, pred_labels.shape)
    if roi is not None:
        found &= roi
    n = int(np.count_nonzero(found))
    return float(np.count_nonzero(pred_labels[found] != true_labels[found]) / n) if n else float("nan")


def evaluate_case(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], roi: Optional[np.ndarray] = None
) -> dict[str, float]:
    """Every metric of docs/DESIGN.md section 4 for one case, as a flat dict (keys ``METRIC_KEYS``).

    pred, target: (H, W, D) masks (anything nonzero is foreground). roi: optional (H, W, D)
    mask (e.g. the liver): both masks are restricted to it and specificity counts negatives
    inside it only. spacing: (row, col, slice) mm.

    Every value comes from the single metric functions above; the work they share (skeletons,
    surface distances) is computed once and passed in, and each of them crops to the masks'
    bounding box (``utils.boxes.bounding_box``), so a 512 x 512 x 120 volume is cheap.
    """
    pred, target = _as_bool(pred, target)
    _spacing(spacing, pred.ndim)
    roi = _roi(roi, pred.shape)
    if roi is not None:
        pred, target = pred & roi, target & roi
    sk_p, sk_t = skeleton(pred), skeleton(target)
    n_p, n_t = n_components(pred), n_components(target)
    dist = surface_distances(pred, target, spacing) if (pred.any() and target.any()) else None
    n_pred, n_true = int(np.count_nonzero(pred)), int(np.count_nonzero(target))
    out: dict[str, float] = {
        "dice": dice(pred, target),
        "cldice": cldice(pred, target, pred_skeleton=sk_p, target_skeleton=sk_t),
        "iou": iou(pred, target),
        "sensitivity": sensitivity(pred, target),
        "specificity": specificity(pred, target, roi),
        "precision": precision(pred, target),
        "hd95_mm": hd95(pred, target, spacing, distances=dist),
        "assd_mm": assd(pred, target, spacing, distances=dist),
        **centreline_recall_by_radius(pred, target, spacing, target_skeleton=sk_t),
        "components_pred": n_p,
        "components_true": n_t,
        "components_ratio": _ratio(n_p, n_t),
        "voxels_pred": n_pred,
        "voxels_true": n_true,
        "empty_pred": int(n_pred == 0),
        "empty_true": int(n_true == 0),
    }
    return {k: out[k] for k in METRIC_KEYS}
