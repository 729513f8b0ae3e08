"""New CT scans for predict.py: find them, read them with their exact geometry, write masks back aligned.

A scan is read by the same readers as preprocessing (``preprocessing.dicom_reader.read_series``
for DICOM, ``preprocessing.nifti_reader.read_nifti_case`` for NIfTI), so its array is the
project's (H, W, D) = (rows, columns, slices) float32 HU with spacing (row, col, slice) mm.

Geometry. An (H, W, D) array is the ITK image whose numpy view is ``arr.transpose(2, 0, 1)``
(x = column, y = row, z = slice). :class:`Geometry` holds that image's size, spacing, origin
and direction (ITK conventions, LPS millimetres):

- DICOM: spacing (PixelSpacing[1], PixelSpacing[0], slice step), origin the
  ImagePositionPatient of the first slice after sorting along the slice normal, direction
  columns (row cosines, column cosines, normal) from ImageOrientationPatient: what
  ``sitk.ImageSeriesReader`` gives for the same series. The array keeps the stored order;
  ``prediction.segment`` runs the models on it reordered to LPS (``utils.orientation``).
- NIfTI: the reader reorients to LPS (``sitk.DICOMOrient``), so the array's geometry is the
  reoriented one; masks are written in that geometry and oriented back to the file's own
  orientation, which is a permutation / flip of axes (no resampling), then given the input
  header's size, spacing, origin and direction exactly.

Bad input raises :class:`preprocessing.errors.PreprocessError` (a ValueError) with one line
naming the case, the file and the problem.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk

from preprocessing.dicom_reader import (
    PATIENT_SERIES,
    DicomFile,
    PatientSource,
    file_index,
    folder_files,
    may_be_slice,
    open_zip,
    read_dataset,
    read_series,
    visible,
    zip_members,
)
from preprocessing.checks import check_3d, check_ct
from preprocessing.errors import PreprocessError
from preprocessing.nifti_reader import NIFTI_SUFFIXES, nifti_stem, read_nifti_case
from utils.atomic import atomic_path

log = logging.getLogger(__name__)

INPUT_KINDS = ("dicom", "dicom-zip", "patient", "nifti")


@dataclass(frozen=True)
class Geometry:
    """ITK geometry of an image: size (x, y, z), spacing (mm), origin (mm, LPS), direction (9, row-major)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, img: sitk.Image) -> "Geometry":
        return cls(tuple(int(s) for s in img.GetSize()), tuple(float(s) for s in img.GetSpacing()),
                   tuple(float(s) for s in img.GetOrigin()), tuple(float(s) for s in img.GetDirection()))

    @classmethod
    def of_file(cls, path: Path) -> "Geometry":
        """Geometry from an image file's header alone (no pixel data read)."""
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return cls(tuple(int(s) for s in reader.GetSize()), tuple(float(s) for s in reader.GetSpacing()),
                   tuple(float(s) for s in reader.GetOrigin()), tuple(float(s) for s in reader.GetDirection()))

    def apply(self, img: sitk.Image) -> sitk.Image:
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def matches(self, other: "Geometry", tol: float = 1e-3) -> bool:
        """Same size, and spacing / origin / direction equal within ``tol`` (mm, or cosines)."""
        return (self.size == other.size and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol)
                and np.allclose(self.direction, other.direction, atol=tol))

    def physical(self, idx_hwd: np.ndarray) -> np.ndarray:
        """Array indices (N, 3) as (row, col, slice), fractional allowed -> LPS points (N, 3) mm."""
        idx = np.asarray(idx_hwd, dtype=np.float64).reshape(-1, 3)
        xyz = idx[:, [1, 0, 2]] * np.asarray(self.spacing)
        d = np.asarray(self.direction).reshape(3, 3)
        return np.asarray(self.origin) + xyz @ d.T

    def describe(self) -> dict:
        return {"size_xyz": list(self.size), "spacing_xyz_mm": list(self.spacing),
                "origin_mm": list(self.origin), "direction": list(self.direction)}


@dataclass(frozen=True)
class CaseSource:
    """One scan to segment: a case name, what it is (``INPUT_KINDS``) and where."""

    name: str
    kind: str
    path: Path


@dataclass
class Scan:
    """A scan read for prediction. ``hu`` float32 (H, W, D); ``spacing`` (row, col, slice) mm.

    ``geometry``: the ITK geometry of the (H, W, D) array; ``output_geometry``: the input's own
    (they differ only for a NIfTI file that is not LPS-ordered, then ``reorient`` is the
    orientation code to turn an array image back into the input's axis order).
    ``positions``: slice positions along the normal (DICOM), for checking mask series.
    """

    case: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry
    output_geometry: Geometry
    reorient: Optional[str] = None
    positions: Optional[np.ndarray] = None
    description: dict = field(default_factory=dict)
    #: DICOM input: the series' headers (no pixel data) in slice order, headers[k] <-> hu[:, :, k]
    dicom_headers: Optional[list] = None


# ----------------------------------------------------------------------------- finding scans
def _visible(p: Path) -> bool:
    return visible(p.name)


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _series_name(p: Path) -> str:
    """Case name of a DICOM folder or zip: its own name, or its parent's for PATIENT_DICOM[.zip]."""
    stem = p.name[:-4] if p.name.lower().endswith(".zip") else p.name
    return p.resolve().parent.name if stem == PATIENT_SERIES else stem


def _single(path: Path) -> Optional[CaseSource]:
    """The one scan ``path`` is, or None when it is a folder of several.

    A folder is one DICOM series when it holds files and no subfolder, zip or NIfTI file.
    """
    if path.is_file():
        if _is_nifti(path):
            return CaseSource(nifti_stem(path), "nifti", path)
        if path.name.lower().endswith(".zip"):
            return CaseSource(_series_name(path), "dicom-zip", path)
        raise PreprocessError(path.name, str(path), "not a .nii / .nii.gz / .zip file, a DICOM folder or a "
                                                    "folder of scans")
    if (path / PATIENT_SERIES).is_dir() or (path / f"{PATIENT_SERIES}.zip").is_file():
        return CaseSource(path.resolve().name, "patient", path)
    entries = [p for p in path.iterdir() if _visible(p)]
    nested = any(p.is_dir() or _is_nifti(p) or p.name.lower().endswith(".zip") for p in entries)
    if not nested and any(p.is_file() and may_be_slice(p.name) for p in entries):
        return CaseSource(_series_name(path), "dicom", path)
    return None  # a folder of scans (loose files beside them are skipped)


def find_cases(path: str | os.PathLike) -> list[CaseSource]:
    """The scans under ``path``: itself (a DICOM folder, a zip of one, a NIfTI file, a 3D-IRCADb
    patient folder) or, for a folder of several, each entry that is one (sorted by name)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found")
    one = _single(path)
    if one is not None:
        return [one]
    cases = []
    for p in sorted((p for p in path.iterdir() if _visible(p)), key=lambda p: p.name):
        if p.is_dir() and not any(_visible(q) for q in p.iterdir()):
            continue
        c = _single(p) if (p.is_dir() or _is_nifti(p) or p.name.lower().endswith(".zip")) else None
        if c is None:
            log.info("%s: not a scan; skipped", p)
            continue
        cases.append(c)
    if not cases:
        raise FileNotFoundError(f"{path}: no DICOM series, zip or NIfTI scan found")
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: several inputs give the case name(s) {', '.join(dupes)}")
    return cases


# ----------------------------------------------------------------------------- DICOM
def _dicom_files(src: CaseSource, stack: contextlib.ExitStack) -> list[DicomFile]:
    """The files of a DICOM case, named by full path (zip members as ``archive.zip:member``);
    archives opened here are closed by ``stack``."""
    if src.kind == "patient":
        files = stack.enter_context(PatientSource(src.path)).ct_files()
        return [DicomFile(str(src.path / f.name), f.index, f.path, f.archive, f.member) for f in files]
    if src.kind == "dicom":
        return folder_files(src.path, f"{src.path}/")
    z = open_zip(src.name, src.path)
    stack.callback(z.close)
    files = [DicomFile(f"{src.path}:{member}", file_index(parts[-1]), archive=z, member=member)
             for parts, member in zip_members(z)]
    if not files:
        raise PreprocessError(src.name, str(src.path), "the zip archive holds no files")
    return sorted(files, key=lambda f: (f.index, f.name))


def choose_series(case: str, where: str, files: Sequence[DicomFile], headers: Sequence[pydicom.Dataset],
                  series: Optional[str]) -> list[int]:
    """Indices of the files of one series: the only one, or ``series`` (a SeriesInstanceUID)."""
    groups: dict[str, list[int]] = {}
    for i, ds in enumerate(headers):
        groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append(i)
    if series is not None:
        if series not in groups:
            raise PreprocessError(case, where, f"no series {series} (has: {', '.join(sorted(groups))})")
        return groups[series]
    if len(groups) > 1:
        shown = ", ".join(f"{uid or '<no UID>'} ({len(ix)} files)" for uid, ix in sorted(groups.items()))
        raise PreprocessError(case, where, f"{len(groups)} series mixed in one folder: {shown}; "
                                           "choose one with --series UID")
    return next(iter(groups.values()))


def read_dicom_scan(src: CaseSource, series: Optional[str] = None) -> Scan:
    """Read a DICOM series (folder, zip or 3D-IRCADb patient folder) with its ITK geometry."""
    with contextlib.ExitStack() as stack:
        files = _dicom_files(src, stack)
        if not files:
            raise PreprocessError(src.name, str(src.path), "no DICOM files")
        headers = [read_dataset(src.name, f, pixels=False) for f in files]
        keep = choose_series(src.name, str(src.path), files, headers, series)
        files, headers = [files[i] for i in keep], [headers[i] for i in keep]
        ser = read_series(src.name, files, ct=True)
    h, w, d = ser.pixels.shape
    check_3d(src.name, str(src.path), (h, w, d))
    # a mask series (3D-IRCADb's MASKS_DICOM: 0 / 255, Modality CT) passes the modality check
    check_ct(src.name, str(src.path), ser.pixels)
    first = headers[[f.name for f in files].index(ser.files[0])]
    geom = Geometry((w, h, d), (ser.spacing[1], ser.spacing[0], ser.spacing[2]), ser.origin, ser.direction)
    desc = {
        "path": str(src.path), "format": src.kind, "n_files": len(files),
        "series_uid": str(getattr(first, "SeriesInstanceUID", "")),
        "modality": str(getattr(first, "Modality", "")), "description": str(getattr(first, "SeriesDescription", "")),
        "shape_hwd": [h, w, d], "spacing_rcs_mm": list(ser.spacing), **geom.describe(),
    }
    by_name = {f.name: hdr for f, hdr in zip(files, headers)}
    return Scan(src.name, ser.pixels, ser.spacing, geom, geom, None, ser.positions, desc,
                [by_name[name] for name in ser.files])


# ----------------------------------------------------------------------------- NIfTI
def _lps_geometry(g: Geometry) -> Geometry:
    """Geometry of an image of geometry ``g`` after ``sitk.DICOMOrient(img, "LPS")``."""
    ref = g.apply(sitk.Image(list(g.size), sitk.sitkUInt8))
    return Geometry.of(sitk.DICOMOrient(ref, "LPS"))


def read_nifti_scan(src: CaseSource) -> Scan:
    """Read a NIfTI scan (reoriented to LPS by the preprocessing reader) with both geometries."""
    data = read_nifti_case(src.name, src.path, None)  # refuses a 2-D image and one not in HU
    hu = data.hu
    h, w, d = hu.shape
    out = Geometry.of_file(src.path)
    arr_geom = _lps_geometry(out)
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(out.direction)
    reorient = None if arr_geom.matches(out, tol=0.0) else code
    desc = {"path": str(src.path), "format": "nifti", "shape_hwd": [h, w, d], "spacing_rcs_mm": list(data.spacing),
            "orientation": code, **out.describe()}
    return Scan(src.name, hu, data.spacing, arr_geom, out, reorient, None, desc)


def read_scan(src: CaseSource, series: Optional[str] = None) -> Scan:
    """A scan as ``hu`` float32 (H, W, D) in HU with spacing (row, col, slice) mm and its geometry:
    DICOM (folder, zip, patient folder; ``series`` picks a SeriesInstanceUID) or NIfTI."""
    if src.kind == "nifti":
        if series is not None:
            log.warning("%s: --series ignored for a NIfTI file", src.path)
        return read_nifti_scan(src)
    return read_dicom_scan(src, series)


# ----------------------------------------------------------------------------- writing and masks
def to_image(arr: np.ndarray, scan: Scan) -> sitk.Image:
    """(H, W, D) array -> ITK image in the input's own geometry (axis order, origin, direction)."""
    if arr.shape != scan.hu.shape:
        raise ValueError(f"array shape {arr.shape} differs from the scan's {scan.hu.shape}")
    img = scan.geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 0, 1)))))
    if scan.reorient is not None:
        img = sitk.DICOMOrient(img, scan.reorient)
        back = Geometry.of(img)
        if not back.matches(scan.output_geometry):
            raise ValueError(f"{scan.case}: reorienting back to {scan.reorient} gave {back}, not the input's "
                             f"{scan.output_geometry}")
    return scan.output_geometry.apply(img)


def write_nifti(path: Path, img: sitk.Image) -> Path:
    """Write ``img`` atomically (compressed when the name ends in .gz)."""
    with atomic_path(path) as tmp:
        # SimpleITK picks the writer by the suffix: the temporary name keeps it
        tmp_nii = tmp.with_name(f"{tmp.name}-{uuid.uuid4().hex[:6]}{''.join(path.suffixes[-2:])}")
        try:
            sitk.WriteImage(img, str(tmp_nii), useCompression=path.name.endswith(".gz"))
            tmp_nii.replace(tmp)
        finally:
            tmp_nii.unlink(missing_ok=True)
    return path


def read_mask(path: str | os.PathLike, scan: Scan) -> np.ndarray:
    """A mask (e.g. the liver) for ``scan`` as bool (H, W, D): a NIfTI file on the scan's grid (in any
    axis order), or a DICOM mask series (values > 0) with the scan's slices: a folder, a folder of
    mask folders or a zip of them (its ``liver`` one, as 3D-IRCADb's MASKS_DICOM)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: mask not found")
    if path.is_file() and _is_nifti(path):
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as e:
            raise PreprocessError(scan.case, str(path), f"not a readable NIfTI file "
                                                        f"({str(e).strip().splitlines()[-1]})") from None
        if img.GetDimension() != 3:
            raise PreprocessError(scan.case, str(path), f"a {img.GetDimension()}-D mask; the scan is 3-D")
        # the same voxels stored in another axis order (a mask saved RAS for a scan stored LPS) are
        # reordered, not refused: only the grid in the patient must be the scan's
        order = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(scan.geometry.direction)
        moved = sitk.DICOMOrient(img, order)
        if not Geometry.of(moved).matches(scan.geometry):
            raise PreprocessError(scan.case, str(path), f"mask geometry {Geometry.of(img).describe()} differs from "
                                                        f"the scan's {scan.output_geometry.describe()}")
        return np.transpose(sitk.GetArrayFromImage(moved), (1, 2, 0)) > 0
    if path.is_file() and path.name.lower().endswith(".zip"):
        with contextlib.closing(open_zip(scan.case, path)) as z:
            return _mask_series(scan, path, _zip_mask_files(scan.case, path, z))
    if not path.is_dir():
        raise PreprocessError(scan.case, str(path), "mask must be a .nii / .nii.gz file, a DICOM mask folder or a "
                                                    "zip of one")
    files = folder_files(path, f"{path}/")
    if not files:  # a folder of mask folders (3D-IRCADb's MASKS_DICOM): its liver one
        subs = {p.name: p for p in path.iterdir() if p.is_dir() and visible(p.name)}
        if subs:
            pick = subs[_liver_folder(scan.case, path, list(subs), lone_ok=False)]
            path, files = pick, folder_files(pick, f"{pick}/")
    return _mask_series(scan, path, files)


def _liver_folder(case: str, path: Path, folders: Sequence[str], lone_ok: bool) -> str:
    """Which of the mask folders ``folders`` (paths, "/"-separated) in the folder or zip ``path`` is the
    mask: the one named ``liver`` (3D-IRCADb's MASKS_DICOM holds one folder per structure), or, with
    ``lone_ok``, the only one (a zip holding one series is that mask; a folder's lone subfolder could
    be anything, a CT series even); PreprocessError naming them otherwise."""
    pick = next((f for f in folders if f.rsplit("/", 1)[-1].lower() == "liver"), None)
    if pick is None and lone_ok and len(folders) == 1:
        pick = folders[0]
    if pick is None:
        shown = ", ".join(sorted(f or "<top>" for f in folders))
        raise PreprocessError(case, str(path), f"holds several mask folders ({shown}) and none is named 'liver'; "
                                               "give the mask's own folder")
    return pick


def _zip_mask_files(case: str, path: Path, z: zipfile.ZipFile) -> list[DicomFile]:
    """The slices of the mask series in an open zip: the folder :func:`_liver_folder` picks."""
    folders: dict[str, list[tuple[list[str], str]]] = {}
    for parts, member in zip_members(z):
        folders.setdefault("/".join(parts[:-1]), []).append((parts, member))
    files = [DicomFile(f"{path}:{member}", file_index(parts[-1]), archive=z, member=member)
             for parts, member in folders[_liver_folder(case, path, list(folders), lone_ok=True)]]
    return sorted(files, key=lambda f: (f.index, f.name))


def _mask_series(scan: Scan, path: Path, files: list[DicomFile]) -> np.ndarray:
    """The DICOM mask series ``files`` as bool (H, W, D), checked against ``scan``'s slices."""
    if not files:
        raise PreprocessError(scan.case, str(path), "mask folder holds no files")
    m = read_series(scan.case, files, ct=False, strict=False)
    if m.pixels.shape != scan.hu.shape:
        raise PreprocessError(scan.case, str(path), f"mask is {m.pixels.shape} (H, W, D), the scan "
                                                    f"{scan.hu.shape}")
    if m.positions is not None and scan.positions is not None:
        off = float(np.abs(m.positions - scan.positions).max())
        if off > 0.01:
            raise PreprocessError(scan.case, str(path), f"mask slice positions differ from the scan's by "
                                                        f"{off:.3f} mm")
    return m.pixels > 0
