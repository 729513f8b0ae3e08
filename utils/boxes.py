"""Bounding boxes of masks, shared by the metrics (which crop to them) and the liver's post-processing."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> Optional[tuple[slice, ...]]:
    """Bounding box of ``mask`` (any number of axes) grown by ``margin`` voxels (one number, or one
    per axis) and clipped to the array; None if the mask is empty."""
    mask = np.asarray(mask)
    if not mask.any():
        return None
    margins = [int(margin)] * mask.ndim if np.isscalar(margin) else [int(m) for m in margin]
    if len(margins) != mask.ndim:
        raise ValueError(f"one margin or {mask.ndim}, got {len(margins)}")
    box = []
    for ax, m in enumerate(margins):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        box.append(slice(max(int(idx[0]) - m, 0), min(int(idx[-1]) + 1 + m, mask.shape[ax])))
    return tuple(box)
