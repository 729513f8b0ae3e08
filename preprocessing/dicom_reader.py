"""Read one 3D-IRCADb-style patient (DICOM folders or nested zips) into HU and masks.

Layout (docs/DESIGN.md section 2)::

    <patient>/PATIENT_DICOM/image_<i>            or <patient>/PATIENT_DICOM.zip
    <patient>/MASKS_DICOM/<organ>/image_<i>      or <patient>/MASKS_DICOM.zip

Arrays come back as (H, W, D) = (rows, columns, slices) with slices ordered by
ImagePositionPatient projected on the slice normal (the cross product of the
ImageOrientationPatient row and column directions), falling back to
InstanceNumber and then to the file's trailing index. Spacing is (row, column,
slice) in mm: PixelSpacing gives the first two, the slice positions the third.
Zip members are read from memory; nothing is unpacked to disk.
"""
from __future__ import annotations

import io
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from preprocessing.errors import PreprocessError
from utils.orientation import lps_view

log = logging.getLogger(__name__)

PATIENT_SERIES = "PATIENT_DICOM"
MASKS_FOLDER = "MASKS_DICOM"
LIVER = "liver"
# One vessel can be filed under several folder names; requesting any name of a group takes the union
# of every folder of that group a patient has (docs/DESIGN.md section 2: venacava is the venous system's
# other name in some cases).
VESSEL_GROUPS: tuple[tuple[str, ...], ...] = (("venoussystem", "venacava"),)

_POSITION_TOL_MM = 1e-3
_GAP_REL_TOL = 0.1


@dataclass(frozen=True)
class DicomFile:
    """One DICOM file of a series: a path on disk, or a member of an open zip archive."""

    name: str  # as shown in messages, relative to the patient folder
    index: int  # trailing integer of the file name (image_<i>), -1 if none
    path: Optional[Path] = None
    archive: Optional[zipfile.ZipFile] = None
    member: Optional[str] = None

    def open(self) -> Union[Path, io.BytesIO]:
        if self.path is not None:
            return self.path
        if self.archive is None or self.member is None:
            raise ValueError(f"{self.name}: a DICOM file needs a path, or a zip archive and a member name")
        return io.BytesIO(self.archive.read(self.member))


@dataclass
class Series:
    """A sorted series: ``pixels`` (H, W, D), a slice-major view: float32 HU for CT, uint8 {0, 1} for masks."""

    pixels: np.ndarray
    spacing: tuple[float, float, float]
    positions: Optional[np.ndarray]  # (D,) mm along the slice normal, None when unknown
    files: list[str]  # file names in slice order
    #: ITK direction (9, row-major; columns: along a row, along a column, the slice normal)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    #: ITK origin (x, y, z) mm: the first slice's ImagePositionPatient, (0, 0, 0) when it has none
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class PatientData:
    """One patient read from disk. ``hu`` float32 (H, W, D) in HU; masks uint8 {0, 1} of the same shape."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    label: Optional[np.ndarray]
    liver: Optional[np.ndarray]
    source: str
    attrs: dict = field(default_factory=dict)
    #: uint8 class map (0 background, i = the i-th of the requested classes) or None
    classes: Optional[np.ndarray] = None


def geometry_attrs(origin: Sequence[float], direction: Sequence[float]) -> dict:
    """The HDF5 attributes that place a stored (H, W, D) array in the patient's space, before any
    crop: ``origin_mm`` (ITK x, y, z of voxel (0, 0, 0)) and ``direction`` (ITK, 9 values
    row-major; its columns are the directions of a row, a column and the slices), so a prediction
    written as NIfTI overlays the source scan (:func:`evaluation.predictions.to_sitk`)."""
    return {"origin_mm": np.asarray(origin, dtype=np.float64), "direction": np.asarray(direction, dtype=np.float64)}


#: files that sit beside a series but are not slices of it
SKIP_FILES = frozenset({"DICOMDIR"})
#: endings of documents and pictures left beside a series (a README, a key image): a slice has none of
#: them (most have no ending, ".dcm" or ".ima")
SKIP_SUFFIXES = (".txt", ".md", ".pdf", ".json", ".xml", ".csv", ".html", ".htm", ".log", ".ini", ".png", ".jpg",
                 ".jpeg")


def file_index(name: str) -> int:
    """The trailing integer of a file name (``image_12`` -> 12), -1 when there is none."""
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def visible(name: str) -> bool:
    """Not a hidden file nor a macOS resource folder."""
    return not (name.startswith(".") or name.startswith("__MACOSX"))


def may_be_slice(name: str) -> bool:
    """A file name a series' slice may have: visible, not a DICOMDIR, not a document or picture."""
    return visible(name) and name not in SKIP_FILES and not name.lower().endswith(SKIP_SUFFIXES)


def _sorted_files(files: list[DicomFile]) -> list[DicomFile]:
    return sorted(files, key=lambda f: (f.index, f.name))


def folder_files(folder: Path, prefix: str) -> list[DicomFile]:
    """The slices of a series folder, sorted by file index, each named ``prefix`` + its file name."""
    return _sorted_files([DicomFile(f"{prefix}{p.name}", file_index(p.name), path=p) for p in folder.iterdir()
                          if p.is_file() and may_be_slice(p.name)])


def zip_members(z: zipfile.ZipFile, prefix: Optional[str] = None) -> list[tuple[list[str], str]]:
    """(path parts, member name) of every visible file of an open archive, ``prefix`` (a top
    folder) taken off the parts where it leads them."""
    out = []
    for info in z.infolist():
        parts = [p for p in info.filename.split("/") if p]
        if info.is_dir() or not parts or not all(visible(p) for p in parts) or not may_be_slice(parts[-1]):
            continue
        if prefix is not None and parts[0] == prefix:
            parts = parts[1:]
        out.append((parts, info.filename))
    return out


def open_zip(case: str, path: Path) -> zipfile.ZipFile:
    """An open archive, or PreprocessError naming the file when it is not one."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PreprocessError(case, str(path), f"not a readable zip archive ({e})") from None


def read_dataset(case: str, f: DicomFile, pixels: bool = True) -> Dataset:
    """One DICOM file (headers only unless ``pixels``); PreprocessError naming it when unreadable."""
    try:
        return pydicom.dcmread(f.open(), stop_before_pixels=not pixels)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for damaged files; all mean "unreadable"
        raise PreprocessError(case, f.name, f"not a readable DICOM file ({type(e).__name__}: "
                                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


class PatientSource:
    """The files of one patient folder; a context manager because zip archives stay open while read."""

    def __init__(self, patient_dir: Path) -> None:
        self.dir = Path(patient_dir)
        self.patient = self.dir.name
        self._archives: list[zipfile.ZipFile] = []

    def __enter__(self) -> "PatientSource":
        return self

    def __exit__(self, *exc: object) -> None:
        for a in self._archives:
            a.close()

    def _zip_members(self, path: Path, prefix: str) -> list[tuple[list[str], str]]:
        """(path parts below ``prefix``, member name) of every file in the archive (kept open)."""
        z = open_zip(self.patient, path)
        self._archives.append(z)
        return zip_members(z, prefix)

    def ct_files(self) -> list[DicomFile]:
        """The CT series' files (PATIENT_DICOM folder or zip), sorted by file index."""
        if not self.dir.is_dir():
            raise PreprocessError(self.patient, "", f"{self.dir} is not a folder")
        folder, archive = self.dir / PATIENT_SERIES, self.dir / f"{PATIENT_SERIES}.zip"
        if folder.is_dir():
            files = folder_files(folder, f"{PATIENT_SERIES}/")
            where = PATIENT_SERIES
        elif archive.is_file():
            z_members = self._zip_members(archive, PATIENT_SERIES)
            z = self._archives[-1]
            files = [
                DicomFile(f"{archive.name}:{m}", file_index(parts[-1]), archive=z, member=m)
                for parts, m in z_members
                if len(parts) == 1
            ]
            where = archive.name
        else:
            has = sorted(p.name for p in self.dir.iterdir() if visible(p.name))
            if not has:
                raise PreprocessError(self.patient, str(self.dir), "empty folder, no PATIENT_DICOM")
            raise PreprocessError(
                self.patient, str(self.dir), f"no {PATIENT_SERIES} folder or {PATIENT_SERIES}.zip (has: {', '.join(has)})"
            )
        if not files:
            raise PreprocessError(self.patient, where, "no DICOM files in the series (empty folder)")
        return _sorted_files(files)

    def mask_files(self) -> Optional[dict[str, list[DicomFile]]]:
        """organ folder name -> files; None when the patient has no MASKS_DICOM at all."""
        folder, archive = self.dir / MASKS_FOLDER, self.dir / f"{MASKS_FOLDER}.zip"
        out: dict[str, list[DicomFile]] = {}
        if folder.is_dir():
            for organ in sorted(p for p in folder.iterdir() if p.is_dir() and visible(p.name)):
                out[organ.name] = folder_files(organ, f"{MASKS_FOLDER}/{organ.name}/")
        elif archive.is_file():
            members = self._zip_members(archive, MASKS_FOLDER)
            z = self._archives[-1]
            for parts, m in members:
                if len(parts) == 2:
                    out.setdefault(parts[0], []).append(
                        DicomFile(f"{archive.name}:{m}", file_index(parts[1]), archive=z, member=m)
                    )
        else:
            return None
        return {k: _sorted_files(v) for k, v in out.items()}


def floats(ds: Dataset, keyword: str, n: int) -> Optional[np.ndarray]:
    """A multi-valued tag as ``n`` float64 values, None when it is missing or malformed."""
    v = getattr(ds, keyword, None)
    if v is None:
        return None
    try:
        arr = np.asarray([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) else None


def _slice_order(
    patient: str, files: list[DicomFile], dsets: list[Dataset], strict: bool
) -> tuple[np.ndarray, Optional[np.ndarray], Optional[float]]:
    """(order, sorted positions along the normal or None, slice spacing from positions or None).

    ``strict``: duplicate positions are an error (image series); otherwise (mask series, whose
    geometry tags are less trustworthy) fall back to InstanceNumber / file index with a warning.
    """
    n = len(dsets)
    ipps = [floats(ds, "ImagePositionPatient", 3) for ds in dsets]
    iops = [floats(ds, "ImageOrientationPatient", 6) for ds in dsets]
    if all(p is not None for p in ipps):
        iop = next((o for o in iops if o is not None), np.array([1.0, 0, 0, 0, 1, 0]))
        for f, o in zip(files, iops):
            if o is not None and np.abs(o - iop).max() > 1e-4:
                raise PreprocessError(patient, f.name, f"ImageOrientationPatient {list(o)} differs from {list(iop)}")
        normal = np.cross(iop[:3], iop[3:])
        proj = np.array([float(np.dot(p, normal)) for p in ipps])
        order = np.argsort(proj, kind="stable")
        pos = proj[order]
        if n == 1:
            return order, pos, None
        diffs = np.diff(pos)
        dup = np.flatnonzero(diffs < _POSITION_TOL_MM)
        if dup.size == 0:
            # DS strings carry ~1e-7 mm noise; a rounded step keeps spacing attrs clean (1.6, not 1.5999999)
            step = round(float(np.median(diffs)), 6)
            gaps = np.flatnonzero(np.abs(diffs - step) > _GAP_REL_TOL * step)
            if gaps.size:
                log.warning(
                    "%s: uneven slice spacing (median %.3f mm; %d step(s) differ, first after %s: %.3f mm)",
                    patient, step, gaps.size, files[order[gaps[0]]].name, diffs[gaps[0]],
                )
            return order, pos, step
        a, b = files[order[dup[0]]].name, files[order[dup[0] + 1]].name
        msg = f"duplicate slice position {pos[dup[0]]:.3f} mm along the normal (also in {a})"
        if strict:
            raise PreprocessError(patient, b, msg)
        log.warning("%s: %s: %s; ordering by InstanceNumber / file index", patient, b, msg)
    inst = [getattr(ds, "InstanceNumber", None) for ds in dsets]
    if all(i is not None for i in inst) and len({int(i) for i in inst}) == n:
        return np.argsort([int(i) for i in inst], kind="stable"), None, None
    return np.arange(n), None, None  # files are already sorted by their trailing index


def read_series(patient: str, files: Sequence[DicomFile], *, ct: bool, strict: bool = True) -> Series:
    """Read and sort one series.

    ``ct``: check Modality and apply RescaleSlope / RescaleIntercept (-> float32 HU); otherwise a
    mask, stored as uint8 {0, 1} (> 0, so 0/255 and 0/1 masks read alike).
    """
    files = list(files)
    if not files:
        raise PreprocessError(patient, "", "empty series")
    dsets = [read_dataset(patient, f) for f in files]
    first = dsets[0]
    if ct:
        for f, ds in zip(files, dsets):
            modality = getattr(ds, "Modality", None)
            if modality is not None and str(modality).upper() != "CT":
                raise PreprocessError(patient, f.name, f"Modality is {str(modality)!r}, expected CT")
    size0 = (getattr(first, "Rows", None), getattr(first, "Columns", None))
    for f, ds in zip(files, dsets):
        size = (getattr(ds, "Rows", None), getattr(ds, "Columns", None))
        if None in size:
            raise PreprocessError(patient, f.name, "no Rows / Columns: not an image")
        if size != size0:
            raise PreprocessError(
                patient, f.name, f"slice size {size[0]}x{size[1]} differs from {size0[0]}x{size0[1]} of {files[0].name}"
            )
    order, positions, step = _slice_order(patient, files, dsets, strict=strict)
    h, w = int(size0[0]), int(size0[1])
    # Filled slice-major and returned as a (H, W, D) view: writing [:, :, k] of a C-ordered (H, W, D)
    # array is a strided scatter 8x slower, and downstream slices [:, :, k] stay contiguous.
    buf = np.empty((len(files), h, w), dtype=np.float32 if ct else np.uint8)
    for k, i in enumerate(order):
        ds, f = dsets[i], files[i]
        try:
            arr = ds.pixel_array
        except Exception as e:  # decoder errors come as several types; all mean "damaged pixel data"
            raise PreprocessError(patient, f.name, f"pixel data unreadable ({type(e).__name__}: {e})") from None
        if arr.shape != (h, w):
            raise PreprocessError(patient, f.name, f"pixel array shape {arr.shape}, expected ({h}, {w}) (multi-frame?)")
        if ct:
            slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
            intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
            buf[k] = arr
            if slope != 1.0:
                buf[k] *= np.float32(slope)
            if intercept != 0.0:
                buf[k] += np.float32(intercept)
        else:
            buf[k] = arr > 0
    pixels = buf.transpose(1, 2, 0)
    ps = floats(first, "PixelSpacing", 2)
    if ps is None:
        log.warning("%s: %s: no PixelSpacing, assuming 1 mm", patient, files[0].name)
        ps = np.array([1.0, 1.0])
    if step is None:
        for kw in ("SpacingBetweenSlices", "SliceThickness"):
            v = getattr(first, kw, None)
            if v is not None and float(v) > 0:
                step = float(v)
                break
        if step is None:
            step = 1.0
        if len(files) > 1:
            log.warning("%s: slice positions unusable; slice spacing %.3f mm from the header", patient, step)
    iop = next((o for o in (floats(ds, "ImageOrientationPatient", 6) for ds in dsets) if o is not None),
               np.array([1.0, 0, 0, 0, 1, 0]))
    direction = np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])], axis=1)
    ipp = floats(dsets[order[0]], "ImagePositionPatient", 3)
    return Series(pixels, (float(ps[0]), float(ps[1]), float(step)), positions, [files[i].name for i in order],
                  tuple(float(v) for v in direction.reshape(-1)),
                  (0.0, 0.0, 0.0) if ipp is None else tuple(float(v) for v in ipp))


#: which class a voxel claimed by two class masks gets
CLASS_OVERLAP_RULE = "a voxel two masks claim goes to the class listed first"


def vessel_groups(vessels: Sequence[str]) -> list[tuple[str, ...]]:
    """Requested vessel names -> groups of folder names (aliases merged, duplicates dropped)."""
    groups: list[tuple[str, ...]] = []
    for v in vessels:
        v = v.strip().lower()
        if not v:
            continue
        g = next((grp for grp in VESSEL_GROUPS if v in grp), (v,))
        if g not in groups:
            groups.append(g)
    return groups


def _read_mask(patient: str, organ: str, files: list[DicomFile], ct: Series) -> np.ndarray:
    if not files:
        raise PreprocessError(patient, f"{MASKS_FOLDER}/{organ}", "mask folder has no files")
    m = read_series(patient, files, ct=False, strict=False)
    h, w, d = ct.pixels.shape
    if m.pixels.shape[2] != d:
        raise PreprocessError(patient, files[0].name, f"mask {organ!r} has {m.pixels.shape[2]} slices, the image {d}")
    if m.pixels.shape[:2] != (h, w):
        raise PreprocessError(
            patient, files[0].name, f"mask {organ!r} slices are {m.pixels.shape[0]}x{m.pixels.shape[1]}, the image's {h}x{w}"
        )
    if m.positions is not None and ct.positions is not None:
        off = float(np.abs(m.positions - ct.positions).max())
        if off > 0.01:
            raise PreprocessError(patient, files[0].name, f"mask {organ!r} slice positions differ from the image's by {off:.3f} mm")
    return m.pixels


def read_dicom_patient(patient_dir: str | Path, vessels: Sequence[str], with_masks: bool = True,
                       classes: Sequence[str] = ()) -> PatientData:
    """Read ``patient_dir``: HU (H, W, D), spacing (row, col, slice) mm, vessel label and liver mask,
    all in LPS order (:func:`utils.orientation.lps_view`; 3D-IRCADb is stored so).

    Label = union (> 0) of the masks of every requested vessel group; a group the patient lacks
    is a warning listing the folders it has. Without ``with_masks`` the label and liver are None;
    with it, a patient without MASKS_DICOM is a PreprocessError. ``classes`` (e.g. ``portalvein, venoussystem``): also a class map,
    uint8, 0 background and i where the i-th class's mask is; a voxel two masks claim goes to
    the class listed first (``CLASS_OVERLAP_RULE``).
    """
    patient_dir = Path(patient_dir)
    patient = patient_dir.name
    with PatientSource(patient_dir) as src:
        ct = read_series(patient, src.ct_files(), ct=True)
        attrs: dict = {}
        label = liver = None
        if with_masks:
            masks = src.mask_files()
            if masks is None:
                # its volume would be all background, trained on as such, and give no class map
                raise PreprocessError(patient, str(patient_dir), f"no {MASKS_FOLDER} folder or zip "
                                      f"(preprocess.py --no-masks reads scans without labels)")
            else:
                by_lower = {k.lower(): k for k in masks}
                have = ", ".join(sorted(masks)) or "none"
                used: list[str] = []
                label = np.zeros_like(ct.pixels, dtype=np.uint8)  # same memory layout as the masks
                for group in vessel_groups(vessels):
                    found = [by_lower[g] for g in group if g in by_lower]
                    if not found:
                        log.warning("%s: no mask folder %s; the patient has: %s", patient, " / ".join(group), have)
                    for organ in found:
                        label |= _read_mask(patient, organ, masks[organ], ct)
                        used.append(organ)
                attrs["label_masks"] = ",".join(used)
                if classes:
                    cmap = np.zeros_like(ct.pixels, dtype=np.uint8)
                    names = []
                    for i, group in enumerate(vessel_groups(classes), start=1):
                        found = [by_lower[g] for g in group if g in by_lower]
                        if not found:
                            log.warning("%s: class %d: no mask folder %s; the patient has: %s", patient, i,
                                        " / ".join(group), have)
                        for organ in found:
                            cmap[(_read_mask(patient, organ, masks[organ], ct) > 0) & (cmap == 0)] = i
                        names.append(group[0])
                    attrs["class_names"] = ",".join(names)
                if LIVER in by_lower:
                    liver = _read_mask(patient, by_lower[LIVER], masks[by_lower[LIVER]], ct)
                else:
                    log.warning("%s: no %s mask folder; the patient has: %s", patient, LIVER, have)
    cmap = cmap if (with_masks and classes and label is not None) else None
    # the project's arrays are LPS-ordered, as 3D-IRCADb is stored and as the NIfTI reader
    # reorients: a series stored otherwise (feet first, mirrored, coronal) is reordered, not resampled
    view = lps_view(ct.direction)
    if not view.identity:
        log.info("%s: stored in another axis order than LPS: reordered (axes %s, flipped %s)", patient,
                 view.perm, view.flip)
    label, liver, cmap = (None if a is None else view.forward(a) for a in (label, liver, cmap))
    # where the stored (reordered) array lies, so predictions written as NIfTI overlay the series
    attrs.update(geometry_attrs(*view.geometry(ct.origin, ct.direction, ct.spacing, ct.pixels.shape)))
    return PatientData(view.forward(ct.pixels), view.spacing(ct.spacing), label, liver, str(patient_dir), attrs,
                       cmap)
