"""Where a liver mask errs, and how far a correction of each kind could at most take it.

Arrays are (H, W, D) = (rows, columns, slices), argument order (pred, target); spacing is
(row, col, slice) in mm; volumes are mL.

:func:`liver_errors` describes the false negatives (missed liver) by the model's probability and
by how far their HU lie from the scan's parenchyma, the false positives by their distance to the
true liver, and gives the Dice that an *oracle* correction of each family would reach: one that
knows the truth but may only change what its family can reach. Those ceilings say which
post-processing is worth trying before any is built:

- ``threshold``: every missed voxel whose probability is at least ``confident_prob`` added (a
  threshold or a hysteresis lowered to that probability can do no better);
- ``surface``: every wrong voxel within ``surface_mm`` of the predicted surface put right (a
  boundary refinement that moves the surface by at most that much);
- ``intensity``: every missed voxel within ``hu_z`` robust deviations of the parenchyma's median
  HU added (growth by the scan's own liver intensity within that range);
- ``largest_miss``: the largest 26-connected piece of missed liver added.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from evaluation.metrics import dice
from inference.liver import depth_mm, largest_component, near_liver
from utils.boxes import bounding_box


def _share(part: np.ndarray, whole: np.ndarray) -> Optional[float]:
    n = int(np.count_nonzero(whole))
    return None if n == 0 else float(np.count_nonzero(part & whole)) / n


def liver_errors(pred: np.ndarray, target: np.ndarray, prob: np.ndarray, hu: np.ndarray,
                 spacing: Sequence[float], parenchyma: Optional[tuple[float, float]], *,
                 confident_prob: float = 0.05, surface_mm: float = 2.0, hu_z: float = 2.0) -> dict:
    """The error anatomy of a liver mask ``pred`` against ``target`` (bool (H, W, D)); ``prob``
    the liver model's probabilities and ``hu`` the scan in HU (both (H, W, D)), ``spacing``
    (row, col, slice) mm, ``parenchyma`` (median, robust deviation) in HU
    (:func:`inference.liver.parenchyma_hu`; None: the intensity entries are None).

    Returns a dict of plain numbers: ``dice``; ``fn_ml`` and ``fp_ml``; ``fp_near_share``, the
    share of false positives within ``surface_mm`` of the true liver; ``fn_median_prob`` and
    ``fn_confident_share`` (probability below ``confident_prob``); ``fn_median_z`` and
    ``fn_atypical_share`` (more than ``hu_z`` deviations from the median HU); ``largest_miss_ml``
    and its first and last slice ``largest_miss_slices``; and ``ceilings`` (the module's
    docstring), each a Dice. Shares and medians over no voxel are None; with both masks empty the
    Dice is NaN (:func:`evaluation.metrics.dice`) and there are no ceilings."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.ndim != 3 or pred.shape != target.shape or np.shape(prob) != pred.shape or np.shape(hu) != pred.shape:
        raise ValueError(f"pred, target, prob and hu must be (H, W, D) of one shape, got {pred.shape}, "
                         f"{target.shape}, {np.shape(prob)} and {np.shape(hu)}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (mm), got {tuple(spacing)}")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    out: dict = {"dice": float(dice(pred, target))}
    box = bounding_box(pred | target, margin=[int(np.ceil(surface_mm / float(s))) + 1 for s in spacing])
    if box is None:
        return {**out, "fn_ml": 0.0, "fp_ml": 0.0, "fp_near_share": None, "fn_median_prob": None,
                "fn_confident_share": None, "fn_median_z": None, "fn_atypical_share": None,
                "largest_miss_ml": 0.0, "largest_miss_slices": None, "ceilings": {}}
    # the work runs on the masks' bounding box: a whole scan is 40 M voxels
    p, t = pred[box], target[box]
    pr, h = np.asarray(prob[box], dtype=np.float32), np.asarray(hu[box], dtype=np.float32)
    fn, fp = t & ~p, p & ~t
    out["fn_ml"], out["fp_ml"] = float(fn.sum()) * voxel_ml, float(fp.sum()) * voxel_ml
    out["fp_near_share"] = _share(near_liver(t, spacing, surface_mm), fp)
    out["fn_median_prob"] = float(np.median(pr[fn])) if fn.any() else None
    out["fn_confident_share"] = _share(pr < confident_prob, fn)
    typical = np.zeros_like(fn)
    if parenchyma is None:
        out["fn_median_z"] = out["fn_atypical_share"] = None
    else:
        z = np.abs(h - float(parenchyma[0])) / float(parenchyma[1])
        typical = z <= hu_z
        out["fn_median_z"] = float(np.median(z[fn])) if fn.any() else None
        out["fn_atypical_share"] = _share(~typical, fn)
    largest = largest_component(fn)
    out["largest_miss_ml"], out["largest_miss_slices"] = float(largest.sum()) * voxel_ml, None
    if largest.any():
        zs = np.flatnonzero(largest.any(axis=(0, 1))) + (box[2].start or 0)
        out["largest_miss_slices"] = [int(zs[0]), int(zs[-1])]
    # within surface_mm of the predicted surface: inside pred, its depth; outside, the distance to it
    near_surface = np.where(p, depth_mm(p, spacing) <= surface_mm, near_liver(p, spacing, surface_mm))
    out["ceilings"] = {
        "threshold": float(dice(p | (fn & (pr >= confident_prob)), t)),
        "surface": float(dice(np.where(near_surface, t, p), t)),
        "intensity": None if parenchyma is None else float(dice(p | (fn & typical), t)),
        "largest_miss": float(dice(p | largest, t)),
    }
    return out
