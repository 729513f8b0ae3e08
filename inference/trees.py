"""Two vessel trees: from per-class probabilities to a label map, and one tree per connected piece.

A model trained with ``main.py --classes portal,hepatic`` has one sigmoid output per class, so
its probabilities are (K, H, W, D). The project's rules:

- :func:`tree_labels`: the *union* mask is where the largest class probability reaches the
  threshold (the binary rule applied to max_k p_k, so a multi-class model's union compares with
  a binary model's mask), small components dropped as for binary models; inside it each voxel
  takes the class with the highest probability. Label map uint8: 0 background, k + 1 for class k.
- :func:`consistent_trees`: which tree a vessel belongs to is a 3-D question (where it
  connects), but a 2-D model decides it slice by slice, so stretches of one vessel flip between
  trees. Within each connected piece of the union: when one class holds at least
  ``majority`` of the piece's voxels, the whole piece takes it; otherwise (two trees that touch)
  each class keeps its largest 26-connected part and every smaller part of it, which by
  construction touches the other class, joins the other class.

Arrays are (H, W, D); spacing (row, col, slice) in mm.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from inference.core import vessel_mask

#: a connected piece whose voxels are at least this share one class becomes that class entirely
MAJORITY = 0.8
_FULL = np.ones((3, 3, 3), dtype=bool)


def tree_labels(prob: np.ndarray, spacing: Sequence[float], threshold: float = 0.5,
                min_component_mm3: float = 0.0, roi: Optional[np.ndarray] = None) -> np.ndarray:
    """Label map uint8 (H, W, D) of class probabilities (K, H, W, D): 0 where max_k p_k is under
    ``threshold`` (or outside ``roi``, or in a union component under ``min_component_mm3``),
    else 1 + argmax_k p_k."""
    prob = np.asarray(prob)
    if prob.ndim != 4:
        raise ValueError(f"class probabilities must be (K, H, W, D), got shape {prob.shape}")
    if prob.shape[0] > 254:
        raise ValueError(f"at most 254 classes fit a uint8 label map, got {prob.shape[0]}")
    # the union: the binary rule (inference.core.vessel_mask) on the largest class probability
    best = prob.max(axis=0)
    if roi is not None:
        best = np.where(roi, best, 0.0)
    union = vessel_mask(best, spacing, threshold, min_component_mm3).astype(bool)
    labels = (prob.argmax(axis=0) + 1).astype(np.uint8)
    labels[~union] = 0
    return labels


def consistent_trees(labels: np.ndarray, majority: float = MAJORITY) -> np.ndarray:
    """The label map with every connected piece of the union made consistent (module docstring);
    the union itself is unchanged."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (H, W, D), got shape {labels.shape}")
    if not 0.5 < majority <= 1.0:
        raise ValueError(f"majority must be in (0.5, 1], got {majority}")
    out = labels.copy()
    pieces, n = ndimage.label(labels > 0, structure=_FULL)
    if n == 0:
        return out
    for i, sl in enumerate(ndimage.find_objects(pieces), start=1):
        piece = pieces[sl] == i
        lab = out[sl]
        values, counts = np.unique(lab[piece], return_counts=True)
        if len(values) < 2:
            continue
        if counts.max() >= majority * counts.sum():
            lab[piece] = values[int(np.argmax(counts))]
            continue
        for v in values:
            parts, m = ndimage.label(piece & (lab == v), structure=_FULL)
            if m < 2:
                continue
            sizes = np.bincount(parts.ravel())
            sizes[0] = 0
            keep = int(np.argmax(sizes))
            stray = (parts > 0) & (parts != keep)
            # a stray part joins the class it touches most (with two classes: the other one)
            ring = ndimage.binary_dilation(stray, structure=_FULL) & piece & ~stray & (lab != v)
            if ring.any():
                nv, nc = np.unique(lab[ring], return_counts=True)
                lab[stray] = nv[int(np.argmax(nc))]
    return out
