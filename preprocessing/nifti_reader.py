"""Read NIfTI datasets (MSD Task08 HepaticVessel, LiVS) into the same convention as the DICOM path.

Each image is reoriented to LPS (``sitk.DICOMOrient``) so array axes run like a DICOM series
with ImageOrientationPatient (1, 0, 0, 0, 1, 0) sorted by increasing position: SimpleITK's
(z, y, x) array transposed to (y, x, z) = (H, W, D) = (rows, columns, slices), spacing
(row, column, slice) = (sy, sx, sz) mm. A phantom written as NIfTI and as DICOM therefore
gives identical arrays.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from preprocessing.dicom_reader import PatientData, geometry_attrs
from preprocessing.checks import check_3d, check_ct
from preprocessing.errors import PreprocessError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# nnU-Net's channel suffix of a one-channel (CT) image: case_0000.nii.gz. Only channel 0: a case
# number of four digits (liver_0001.nii.gz) is part of the name
_CHANNEL_SUFFIX = re.compile(r"_0000$")


def _without_extension(path: Path) -> str:
    name = path.name
    for s in NIFTI_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _nifti_files(folder: Path) -> list[Path]:
    """The visible NIfTI files in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.endswith(NIFTI_SUFFIXES))


def nifti_stem(path: Path) -> str:
    """An image's case name: ``hepaticvessel_001.nii.gz`` -> ``hepaticvessel_001``,
    ``liver_0001_0000.nii.gz`` -> ``liver_0001`` (nnU-Net's channel suffix dropped)."""
    return _CHANNEL_SUFFIX.sub("", _without_extension(path))


def find_nifti_cases(images: Path, labels: Optional[Path]) -> list[tuple[str, Path, Optional[Path]]]:
    """(case name, image file, label file or None) for every NIfTI image in ``images``, sorted by
    name; the case name is :func:`nifti_stem`. A label file has the image's name, or its name
    without nnU-Net's channel suffix (``case_0000.nii.gz`` -> ``case.nii.gz``). With ``labels``, an
    image without one is a ValueError naming it: it would otherwise be trained on as all background."""
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: images folder not found")
    if labels is not None and not labels.is_dir():
        raise FileNotFoundError(f"{labels}: labels folder not found")
    label_files = {} if labels is None else {_without_extension(p): p for p in _nifti_files(labels)}
    out, seen = [], set()
    for p in _nifti_files(images):
        full, stem = _without_extension(p), nifti_stem(p)  # the case is the stem, as predict.py names it
        label = None
        if labels is not None:
            name = full if full in label_files else stem
            if name not in label_files:
                names = f"{full}.nii.gz" + (f" or {stem}.nii.gz" if stem != full else "")
                raise ValueError(f"{p}: no label file {names} in {labels}")
            label = label_files[name]
        if stem in seen:
            raise ValueError(f"{p}: two images give the case name {stem!r}")
        seen.add(stem)
        out.append((stem, p, label))
    return out


def _read(case: str, path: Path) -> sitk.Image:
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise PreprocessError(case, str(path), f"not a readable NIfTI file ({str(e).strip().splitlines()[-1]})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise PreprocessError(
            case, str(path), f"expected a 3-D scalar image, got {img.GetDimension()}-D with {img.GetNumberOfComponentsPerPixel()} component(s)"
        )
    return sitk.DICOMOrient(img, "LPS")


def to_hwd(img: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An LPS-oriented image -> array (H, W, D) and spacing (row, col, slice) in mm."""
    arr = sitk.GetArrayFromImage(img).transpose(1, 2, 0)
    sx, sy, sz = img.GetSpacing()
    return arr, (float(sy), float(sx), float(sz))


def vessel_from_labels(case: str, path: Path, lab: np.ndarray, values: Optional[Sequence[int]]) -> np.ndarray:
    """Label map -> vessel mask {0, 1}.

    ``values`` None picks by content: {0, 1, 2} is MSD Task08 (1 vessel, 2 tumour: vessel only),
    {0, 255} a 0/255 binary mask (LiVS exports); anything else must be named explicitly.
    ``values`` () takes every non-zero value (a liver label with its tumours, MSD Task03).
    """
    if values is not None and len(values) == 0:
        return (lab != 0).astype(np.uint8)
    if values is None:
        present = set(np.unique(lab).tolist())
        if present <= {0, 1, 2}:
            values = (1,)
        elif present <= {0, 255}:
            values = (255,)
        else:
            shown = sorted(present)[:8]
            raise PreprocessError(case, str(path), f"label values {shown} not recognised; pass --label-values")
    return np.isin(lab, np.asarray(values)).astype(np.uint8)


def read_nifti_case(
    case: str, image_path: Path, label_path: Optional[Path], label_values: Optional[Sequence[int]] = None
) -> PatientData:
    """Read one NIfTI case: HU (H, W, D) float32, spacing (row, col, slice) mm, vessel label or None."""
    img = _read(case, image_path)
    hu, spacing = to_hwd(img)
    check_3d(case, str(image_path), hu.shape)
    # the HU window would turn an image scaled to [0, 1] into zeros, silently
    check_ct(case, str(image_path), hu)
    attrs = {"orientation": "LPS", **geometry_attrs(img.GetOrigin(), img.GetDirection())}
    label = None
    if label_path is not None:
        lab_img = _read(case, label_path)
        if lab_img.GetSize() != img.GetSize():
            raise PreprocessError(case, str(label_path), f"label size {lab_img.GetSize()} differs from image size {img.GetSize()}")
        # the origin too: a label shifted by a few cm would be trained on silently
        tol = 0.01 * min(img.GetSpacing())
        if (not np.allclose(lab_img.GetSpacing(), img.GetSpacing(), rtol=1e-3)
                or not np.allclose(lab_img.GetDirection(), img.GetDirection(), atol=1e-3)
                or not np.allclose(lab_img.GetOrigin(), img.GetOrigin(), atol=tol)):
            raise PreprocessError(case, str(label_path), "label geometry (spacing / direction / origin) differs from "
                                                         "the image's")
        lab, _ = to_hwd(lab_img)
        label = vessel_from_labels(case, label_path, np.rint(lab).astype(np.int64), label_values)
    return PatientData(hu.astype(np.float32), spacing, label, None, str(image_path), attrs)
