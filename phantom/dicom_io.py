"""Write volumes as 3D-IRCADb-style DICOM series (the release's layout and quirks).

Array convention everywhere in the project: (H, W, D) = (rows, columns, slices), spacing
(row, column, slice) in mm. Slice ``i`` is written to ``image_<i>`` with
ImagePositionPatient (0, 0, z0 + i * dz), as in the release (only z changes).

Layout of one patient::

    3Dircadb1.<n>/PATIENT_DICOM/image_<i>
    3Dircadb1.<n>/MASKS_DICOM/<organ>/image_<i>
or, with ``zip_output``, the same two folders as nested PATIENT_DICOM.zip / MASKS_DICOM.zip.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _base_dataset(sop_class: str, study_uid: str, series_uid: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "phantom"
    ds.PatientID = "phantom"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def series_bytes(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    kind: str = "ct",
    unsigned_intercept: bool = False,
    z0: float = 0.0,
    patient_id: str = "phantom",
) -> list[bytes]:
    """Encode a (H, W, D) volume as D DICOM files, returned as bytes (slice order).

    ``kind="ct"``: ``volume`` holds HU; int16 with slope 1 / intercept 0, or with
    ``unsigned_intercept`` uint16 stored values and RescaleIntercept -1024.
    ``kind="mask"``: ``volume`` is {0, 1} (or bool); written as uint8 0/255.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be (H, W, D), got shape {volume.shape}")
    h, w, d = volume.shape
    study, series = generate_uid(), generate_uid()
    out: list[bytes] = []
    for i in range(d):
        if kind == "ct":
            ds = _base_dataset(CTImageStorage, study, series, "CT")
            hu = np.rint(volume[:, :, i]).astype(np.int32)
            if unsigned_intercept:
                stored = np.clip(hu + 1024, 0, 65535).astype(np.uint16)
                ds.PixelRepresentation, intercept = 0, -1024.0
            else:
                stored = np.clip(hu, -32768, 32767).astype(np.int16)
                ds.PixelRepresentation, intercept = 1, 0.0
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.RescaleSlope, ds.RescaleIntercept = 1.0, intercept
            ds.RescaleType = "HU"
        elif kind == "mask":
            ds = _base_dataset(SECONDARY_CAPTURE, study, series, "OT")
            stored = np.where(volume[:, :, i] > 0, 255, 0).astype(np.uint8)
            ds.PixelRepresentation = 0
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        else:
            raise ValueError(f"kind must be 'ct' or 'mask', got {kind!r}")
        ds.PatientID = patient_id
        ds.Rows, ds.Columns = h, w
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = float(spacing[2])
        ds.ImagePositionPatient = [0.0, 0.0, float(z0 + i * spacing[2])]
        ds.InstanceNumber = i + 1
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _write_folder(folder: Path, files: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(files):
        (folder / f"image_{i}").write_bytes(data)


def write_patient(
    patient_dir: str | Path,
    hu: np.ndarray,
    masks: Mapping[str, np.ndarray],
    spacing: tuple[float, float, float],
    *,
    unsigned_intercept: bool = False,
    zip_output: bool = False,
    patient_id: Optional[str] = None,
) -> None:
    """Write one patient folder (``PATIENT_DICOM`` and ``MASKS_DICOM/<organ>``) into ``patient_dir``.

    ``patient_dir`` should be a temporary folder the caller renames when complete.
    """
    patient_dir = Path(patient_dir)
    pid = patient_id or patient_dir.name
    ct = series_bytes(hu, spacing, kind="ct", unsigned_intercept=unsigned_intercept, patient_id=pid)
    mask_files = {name: series_bytes(m, spacing, kind="mask", patient_id=pid) for name, m in masks.items()}
    if not zip_output:
        _write_folder(patient_dir / "PATIENT_DICOM", ct)
        for name, files in mask_files.items():
            _write_folder(patient_dir / "MASKS_DICOM" / name, files)
        return
    patient_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(patient_dir / "PATIENT_DICOM.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for i, data in enumerate(ct):
            z.writestr(f"PATIENT_DICOM/image_{i}", data)
    with zipfile.ZipFile(patient_dir / "MASKS_DICOM.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for name, files in mask_files.items():
            for i, data in enumerate(files):
                z.writestr(f"MASKS_DICOM/{name}/image_{i}", data)
