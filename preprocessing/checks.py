"""Checks every reader of a scan applies (preprocess.py and predict.py, DICOM and NIfTI alike)."""
from __future__ import annotations

import numpy as np

from preprocessing.errors import PreprocessError

#: a scan is taken for CT in HU only if its values reach below this (fat, air) ...
CT_MIN_BELOW_HU = -50.0
#: ... and above this (soft tissue)
CT_MAX_ABOVE_HU = 50.0


def check_ct(case: str, path: str, hu: np.ndarray) -> None:
    """A scan in Hounsfield units is finite and reaches below -50 HU (fat, air) and above 50 HU
    (soft tissue); PreprocessError naming ``path`` otherwise (an image scaled to [0, 1], a mask)."""
    bad = int(np.count_nonzero(~np.isfinite(hu)))
    if bad:
        raise PreprocessError(case, path, f"{bad} voxels are NaN or infinite: fill them (air is -1000 HU) first")
    lo, hi = float(hu.min()), float(hu.max())
    if not (lo < CT_MIN_BELOW_HU and hi > CT_MAX_ABOVE_HU):
        raise PreprocessError(case, path, f"values span [{lo:g}, {hi:g}]: not a CT in Hounsfield units "
                                          f"(expected values below {CT_MIN_BELOW_HU:g} and above {CT_MAX_ABOVE_HU:g})")


def check_3d(case: str, path: str, shape: tuple[int, ...]) -> None:
    """A scan (H, W, D) with at least 2 voxels along each axis; PreprocessError naming ``path``."""
    if len(shape) != 3 or min(shape) < 2:
        raise PreprocessError(case, path, f"a 2-D image ({' x '.join(map(str, shape))} voxels); a 3-D scan is "
                                          "needed")
