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
- :func:`cut_trees`: for a tree model's hepatic-minus-portal logit (``inference.tree_model``),
  whose 3 mm grid smears its decision across the places where the two trees touch: the labelling
  of the mask that minimises the voxels' disagreement with the logit plus ``smoothness`` times the
  area of the boundaries between the trees (a minimum s-t cut). The boundaries move to where the
  mask is narrow, where two touching vessels meet, and a stretch of vessel takes one tree.

Arrays are (H, W, D); spacing (row, col, slice) in mm.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from inference.core import vessel_mask
from utils.boxes import bounding_box

#: a connected piece whose voxels are at least this share one class becomes that class entirely
MAJORITY = 0.8
_FULL = np.ones((3, 3, 3), dtype=bool)
#: cut_trees' default weight of the boundary area against the logit (nats per mm^2 of boundary);
#: chosen on 10 phantoms (make_phantoms.py --preset demo --seed 400) kept apart from those reported
TREE_SMOOTHNESS = 8.0
# one of each opposite pair of the 26 neighbours
_HALF_26 = [o for o in np.ndindex(3, 3, 3) if tuple(np.subtract(o, 1)) > (0, 0, 0)]
# the max-flow solver takes int32 capacities (larger ones silently give no flow): costs in units of
# 1/100 nat, fewer for huge masks so that the whole flow fits; logits clipped where the loss is linear
_SCALE = 100
_INT32_ROOM = 2 ** 30
_LOGIT_CLIP = 30.0


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


def check_smoothness(smoothness: float) -> float:
    """``smoothness`` as a float; ValueError unless it is a finite number >= 0."""
    value = float(smoothness)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"tree smoothness must be a number >= 0, got {smoothness}")
    return value


def neighbour_pairs(mask: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each of the 13 offsets that count every 26-neighbour pair once: (step (3,) int, i, j),
    where ``i`` and ``j`` index ``np.argwhere(mask)`` (C order, as ``mask[mask]``) and voxel
    ``j`` is voxel ``i`` plus ``step``, both in ``mask`` (bool (H, W, D))."""
    mask = np.asarray(mask, dtype=bool)
    index = np.full(mask.shape, -1, np.int64)
    voxels = np.argwhere(mask)
    index[mask] = np.arange(len(voxels))
    for o in _HALF_26:
        step = np.subtract(o, 1)
        q = voxels + step
        inside = np.all((q >= 0) & (q < mask.shape), axis=1)
        j = np.full(len(voxels), -1, np.int64)
        j[inside] = index[tuple(q[inside].T)]
        pair = j >= 0
        yield step, np.arange(len(voxels))[pair], j[pair]


def cut_trees(union: np.ndarray, hepatic_minus_portal: np.ndarray, spacing: Sequence[float],
              smoothness: float = TREE_SMOOTHNESS) -> np.ndarray:
    """Label map uint8 (H, W, D) of the mask ``union``: 1 portal, 2 hepatic, 0 outside it.

    Minimises, over the two-label maps of ``union``, the sum over its voxels of the logistic loss
    of their label against ``hepatic_minus_portal`` (the logit, float (H, W, D); clipped to
    +-30, where the loss is linear) plus ``smoothness`` times the boundary between the labels:
    each pair of 26-neighbours labelled apart costs ``smoothness / d``, d their distance in mm,
    so the cost of a flat boundary is proportional to its area whatever the voxel size. Solved
    exactly, up to costs rounded to 1/100 nat, by a minimum s-t cut
    (``scipy.sparse.csgraph.maximum_flow``); where two labellings cost the same, portal, as
    ``smoothness`` 0 does, which gives the logit's sign voxel by voxel (> 0 hepatic).
    """
    union = np.asarray(union, dtype=bool)
    if union.ndim != 3 or np.shape(hepatic_minus_portal) != union.shape:
        raise ValueError(f"union and hepatic_minus_portal must be (H, W, D) alike, got {union.shape} and "
                         f"{np.shape(hepatic_minus_portal)}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive values (mm), got {tuple(spacing)}")
    smoothness = check_smoothness(smoothness)
    out = np.zeros(union.shape, np.uint8)
    box = bounding_box(union)
    if box is None:
        return out
    # the mask's box only: a whole scan's grid is 10-100 times larger than its vessels
    union = union[box]
    logit = np.asarray(np.asarray(hepatic_minus_portal)[box][union], dtype=np.float64)
    if not np.isfinite(logit).all():
        raise ValueError("hepatic_minus_portal is not finite inside the mask")
    if smoothness == 0:
        out[box][union] = np.where(logit > 0, 2, 1)
        return out
    n = int(np.count_nonzero(union))
    source, sink = n, n + 1  # source side: portal
    logit = np.clip(logit, -_LOGIT_CLIP, _LOGIT_CLIP)
    # cutting source -> v labels v hepatic: its loss as hepatic; v -> sink: its loss as portal
    as_hepatic, as_portal = np.logaddexp(0.0, -logit), np.logaddexp(0.0, logit)
    # the flow is at most the smaller side's total
    scale = min(_SCALE, _INT32_ROOM / max(1.0, min(as_hepatic.sum(), as_portal.sum())))
    rows = [np.full(n, source), np.arange(n)]
    cols = [np.arange(n), np.full(n, sink)]
    caps = [np.round(scale * as_hepatic), np.round(scale * as_portal)]
    for step, i, j in neighbour_pairs(union):
        # a capacity above the whole flow cannot saturate: capped there, it still fits int32
        cap = min(_INT32_ROOM, round(scale * smoothness / float(np.linalg.norm(step * np.asarray(spacing)))))
        rows += [i, j]
        cols += [j, i]
        caps += [np.full(len(i), cap), np.full(len(i), cap)]
    graph = sparse.csr_matrix((np.concatenate(caps).astype(np.int32), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(n + 2, n + 2))
    flow = maximum_flow(graph, source, sink).flow
    # scipy's flow is antisymmetric (f on i -> j is -f on j -> i), so this is the residual graph,
    # reverse edges included. Hepatic: the voxels that still reach the sink (searched backwards
    # from it); the rest, ties included, portal
    residual = (graph - flow).tocsr()
    residual.data = (residual.data > 0).astype(np.int8)
    residual.eliminate_zeros()
    hepatic = np.zeros(n + 2, bool)
    hepatic[breadth_first_order(residual.T.tocsr(), sink, directed=True, return_predecessors=False)] = True
    out[box][union] = np.where(hepatic[:n], 2, 1)
    return out
