"""Run the models on a scan in the orientation they were trained in, and give the outputs back.

The training data is LPS-ordered: 3D-IRCADb and the phantoms are stored so (rows run from the
patient's anterior to posterior, columns from right to left, slices from inferior to superior),
and the NIfTI reader reorients to LPS. The liver model is trained without flips (the liver lies
on the patient's right, the image's left), so a DICOM series stored otherwise (feet first, a
flipped or rotated acquisition, sagittal or coronal slices) would be segmented as a mirror image.
:func:`lps_view` gives the permutation and flips of the array axes (no resampling) that put a
scan in LPS order, from its ITK direction matrix, and back.

Arrays are (H, W, D) = (rows, columns, slices), optionally with leading axes (K, H, W, D); the
ITK image of such an array has x = column, y = row, z = slice (``inference.scans``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: for each array axis (row, column, slice), the ITK axis it is (y, x, z) and, in LPS order,
#: the physical axis it must run along (row: +P = y, column: +L = x, slice: +S = z)
_ITK_AXIS = (1, 0, 2)
_LPS_AXIS = (1, 0, 2)


@dataclass(frozen=True)
class Reorientation:
    """``forward``: an array in the scan's stored order -> LPS order; ``back`` undoes it.

    ``perm[t]``: the stored array axis that becomes axis t; ``flip[t]``: axis t is reversed
    after the permutation.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def forward(self, arr: np.ndarray) -> np.ndarray:
        arr, lead = _spatial(arr)
        if self.identity:
            return arr
        out = np.transpose(arr, tuple(range(lead)) + tuple(lead + p for p in self.perm))
        return np.ascontiguousarray(self._flip(out, lead))

    def back(self, arr: np.ndarray) -> np.ndarray:
        arr, lead = _spatial(arr)
        if self.identity:
            return arr
        inverse = tuple(int(i) for i in np.argsort(self.perm))
        axes = tuple(range(lead)) + tuple(lead + p for p in inverse)
        return np.ascontiguousarray(np.transpose(self._flip(arr, lead), axes))

    def _flip(self, arr: np.ndarray, lead: int) -> np.ndarray:
        flips = tuple(lead + t for t in range(3) if self.flip[t])
        return np.flip(arr, flips) if flips else arr

    def box_back(self, box: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
        """A box (r0, r1, c0, c1, s0, s1) of the reoriented array of ``shape`` (H, W, D) -> the same
        voxels' box in the stored array."""
        if len(box) != 6 or len(shape) != 3:
            raise ValueError(f"a box is 6 ints and a shape 3, got {tuple(box)} and {tuple(shape)}")
        out = [0] * 6
        for t in range(3):
            lo, hi = int(box[2 * t]), int(box[2 * t + 1])
            if self.flip[t]:
                lo, hi = int(shape[t]) - hi, int(shape[t]) - lo
            a = self.perm[t]
            out[2 * a], out[2 * a + 1] = lo, hi
        return tuple(out)

    def geometry(self, origin: Sequence[float], direction: Sequence[float], spacing: Sequence[float],
                 shape: Sequence[int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The ITK (origin mm, direction 9 values row-major) of the reoriented array, from those of
        the stored array of ``shape`` (H, W, D) and ``spacing`` (row, col, slice) mm: the same
        voxels at the same places in the patient."""
        if len(origin) != 3 or len(direction) != 9 or len(spacing) != 3 or len(shape) != 3:
            raise ValueError("origin, direction, spacing and shape must have 3, 9, 3 and 3 values")
        m = np.asarray(direction, dtype=float).reshape(3, 3)
        cols = np.zeros((3, 3))
        first = np.zeros(3)  # the stored index (row, col, slice) of the reoriented array's voxel (0, 0, 0)
        for t in range(3):
            a = self.perm[t]
            cols[:, _ITK_AXIS[t]] = m[:, _ITK_AXIS[a]] * (-1.0 if self.flip[t] else 1.0)
            if self.flip[t]:
                first[a] = int(shape[a]) - 1
        step = np.array([first[1] * spacing[1], first[0] * spacing[0], first[2] * spacing[2]])  # ITK x, y, z
        new_origin = np.asarray(origin, dtype=float) + m @ step
        return tuple(float(v) for v in new_origin), tuple(float(v) for v in cols.reshape(-1))

    def spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        """(row, col, slice) mm of the reoriented array."""
        if len(spacing) != 3:
            raise ValueError(f"spacing must be 3 numbers (row, col, slice) mm, got {tuple(spacing)}")
        return tuple(float(spacing[p]) for p in self.perm)


def _spatial(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """``arr`` as an array and its number of leading (non-spatial) axes; ValueError under 3-D."""
    arr = np.asarray(arr)
    if arr.ndim < 3:
        raise ValueError(f"an array of shape (..., H, W, D) is needed, got {arr.shape}")
    return arr, arr.ndim - 3


def lps_view(direction: Sequence[float]) -> Reorientation:
    """The :class:`Reorientation` to LPS order of an array whose ITK image has the direction
    matrix ``direction`` (9 numbers, row-major; column i is ITK axis i's direction in LPS
    patient coordinates). Each array axis goes to the physical axis it runs closest to, as
    ``SimpleITK.DICOMOrient`` does; where two run closest to the same one (a tilt of 45 degrees
    or more), the closer pair is matched first and the other axis takes the best one left.
    ValueError for a matrix with a zero column."""
    m = np.asarray(direction, dtype=float)
    if m.size != 9 or not np.all(np.isfinite(m)):
        raise ValueError(f"a direction matrix is 9 finite numbers, got {list(np.ravel(m))}")
    m = m.reshape(3, 3)
    cos = np.stack([m[:, _ITK_AXIS[a]] for a in range(3)])  # (array axis, physical axis)
    if not np.all(np.abs(cos).max(axis=1) > 0):
        raise ValueError(f"direction matrix {m.round(3).tolist()} has an axis without a direction")
    phys = {}  # physical axis -> (stored array axis, its sign)
    taken = set()
    for a, p in sorted(((a, p) for a in range(3) for p in range(3)), key=lambda ap: (-abs(cos[ap]), ap)):
        if a not in taken and p not in phys:
            phys[p] = (a, bool(cos[a, p] < 0))
            taken.add(a)
    perm = tuple(phys[_LPS_AXIS[t]][0] for t in range(3))
    flip = tuple(phys[_LPS_AXIS[t]][1] for t in range(3))
    return Reorientation(perm, flip)
