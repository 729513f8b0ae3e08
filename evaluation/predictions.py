"""Prediction files: HDF5 in the project's layout or NIfTI that opens aligned in 3D Slicer / ITK-SNAP.

Arrays are (H, W, D) = (rows, columns, slices) with spacing (row, col, slice) mm. ITK images
index (x, y, z) = (column, row, slice), and ``sitk.GetImageFromArray`` takes a numpy array
indexed [z, y, x], so the volume is written as ``arr.transpose(2, 0, 1)`` with ITK spacing
(col, row, slice). With the source scan's geometry (the volume file's ``origin_mm`` and
``direction`` attributes, written by preprocess.py since they exist) the image lies where the
cropped part of the source scan lies, so it overlays the scan in 3D Slicer; without it (older
files, the authors' release) the origin is the crop offset in mm and the direction identity, so
predictions of a cropped volume line up with each other and with the image written beside them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
import SimpleITK as sitk

from inference import binarize
from utils.atomic import atomic_path

PRED_FORMATS = ("h5", "nifti")


def _offset_mm(spacing: Sequence[float], crop: Optional[Sequence[int]]) -> np.ndarray:
    """The crop's first voxel in mm along the index axes (x = column, y = row, z = slice)."""
    if crop is None or len(crop) != 6:
        return np.zeros(3)
    row0, col0, sl0 = crop[0], crop[2], crop[4]
    return np.array([col0 * spacing[1], row0 * spacing[0], sl0 * spacing[2]], dtype=np.float64)


def to_sitk(arr: np.ndarray, spacing: Sequence[float], crop: Optional[Sequence[int]] = None,
            origin: Optional[Sequence[float]] = None, direction: Optional[Sequence[float]] = None) -> sitk.Image:
    """(H, W, D) array -> SimpleITK image with x = column, y = row, z = slice. ``origin`` (mm) and
    ``direction`` (ITK, 9 values): the uncropped source array's geometry, when known."""
    if arr.ndim != 3:
        raise ValueError(f"array must be (H, W, D), got shape {arr.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 0, 1))))
    img.SetSpacing((float(spacing[1]), float(spacing[0]), float(spacing[2])))
    rot = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    base = np.zeros(3) if origin is None else np.asarray(origin, dtype=np.float64).reshape(3)
    img.SetOrigin(tuple(float(v) for v in base + rot @ _offset_mm(spacing, crop)))
    img.SetDirection(tuple(float(v) for v in rot.reshape(-1)))
    return img


def from_sitk(img: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Inverse of :func:`to_sitk`: ((H, W, D) array, spacing (row, col, slice) mm)."""
    arr = np.transpose(sitk.GetArrayFromImage(img), (1, 2, 0))
    sx, sy, sz = img.GetSpacing()
    return arr, (float(sy), float(sx), float(sz))


def save_prediction(
    out_dir: Path,
    case: str,
    prob: np.ndarray,
    spacing: Sequence[float],
    fmt: str,
    *,
    as_mask: bool = False,
    mask: Optional[np.ndarray] = None,
    image: Optional[np.ndarray] = None,
    crop: Optional[Sequence[int]] = None,
    origin: Optional[Sequence[float]] = None,
    direction: Optional[Sequence[float]] = None,
) -> list[Path]:
    """Write ``prob`` (H, W, D) float32 in [0, 1] (or, ``as_mask``, its mask uint8) for ``case``.

    The mask is ``mask`` when given (e.g. the post-processed one that was scored), else
    ``inference.binarize(prob)``.

    h5: ``<case>_pred.h5`` with dataset ``prob`` (float32) or ``mask`` (uint8), attrs spacing.
    nifti: ``<case>_pred.nii.gz`` and, when ``image`` is given, ``<case>_image.nii.gz`` beside
    it so the two open aligned; with ``origin`` and ``direction`` (the source's, :func:`to_sitk`)
    both overlay the source scan. Returns the written paths.
    """
    if fmt not in PRED_FORMATS:
        raise ValueError(f"unknown prediction format {fmt!r}; valid: {', '.join(PRED_FORMATS)}")
    if not as_mask:
        data = prob.astype(np.float32)
    else:
        data = binarize(prob) if mask is None else np.asarray(mask).astype(np.uint8)
    written = []
    if fmt == "h5":
        path = out_dir / f"{case}_pred.h5"
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("mask" if as_mask else "prob", data=data, compression="gzip", compression_opts=4)
                f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
                if crop is not None:
                    f.attrs["crop"] = np.asarray(crop, dtype=np.int64)
        written.append(path)
    else:
        items = [(f"{case}_pred.nii.gz", data)]
        if image is not None:
            items.append((f"{case}_image.nii.gz", image.astype(np.float32)))
        for name, arr in items:
            path = out_dir / name
            # the temporary name must keep the .nii.gz suffix: SimpleITK picks the writer by it
            with atomic_path(path) as tmp:
                tmp_nii = tmp.with_name(tmp.name + ".nii.gz")
                try:
                    sitk.WriteImage(to_sitk(arr, spacing, crop, origin, direction), str(tmp_nii),
                                    useCompression=True)
                    tmp_nii.replace(tmp)
                finally:
                    tmp_nii.unlink(missing_ok=True)
            written.append(path)
    return written
