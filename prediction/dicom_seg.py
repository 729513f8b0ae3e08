"""A vessel mask as a DICOM Segmentation object (DICOM-SEG) for a hospital's viewer.

:func:`write_dicom_seg` stores a mask (H, W, D) of a DICOM series as a binary SEG made with
``highdicom``: one frame per source slice (``headers[k]`` <-> ``mask[:, :, k]``, the order
``inference.scans.read_dicom_scan`` reads them in), referencing every source SOP instance, and
one segment per label (1: liver vessels; with two trees 1: portal vein, 2: hepatic veins) with
its SNOMED CT code and a display colour. PACS viewers, OHIF and 3D Slicer's DICOM browser open it.
A series without a FrameOfReferenceUID (3D-IRCADb's) is given one derived from its
SeriesInstanceUID, the same at every run; missing type-2 patient and study attributes are empty.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

# highdicom logs every module it copies at INFO: too much for predict.py's console
logging.getLogger("highdicom").setLevel(logging.WARNING)

#: label -> (segment label, SNOMED CT property type, display colour RGB)
SEGMENTS = {
    "vessels": [(1, "liver vessels", "BloodVessel", (220, 40, 40))],
    "trees": [(1, "portal vein", "PortalVein", (220, 40, 40)), (2, "hepatic veins", "HepaticVein", (40, 90, 230))],
}


#: patient and study attributes of type 2 (present, may be empty) that highdicom copies from the
#: source; many exports (3D-IRCADb's among them) leave some out
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _complete(header, frame_of_reference: str):
    """A copy of ``header`` with the type-2 attributes it lacks present and empty, and the series'
    frame of reference where it has none (a SEG requires one; 3D-IRCADb's files have none)."""
    ds = copy.deepcopy(header)
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "FrameOfReferenceUID" not in ds:
        ds.FrameOfReferenceUID = frame_of_reference
    return ds


#: DICOM's Long String (LO), which both version attributes are, holds at most 64 characters
LO_MAX = 64


def short_version(version: str) -> str:
    """``version`` (``<sha>[-dirty][+plugins-<hash>]``) within :data:`LO_MAX` characters: the commit
    shortened to 12 hex digits when the whole would not fit, the suffixes kept."""
    if len(version) <= LO_MAX:
        return version
    sha, sep, rest = version.partition("-") if "-" in version else version.partition("+")
    return (sha[:12] + sep + rest)[:LO_MAX]


def write_dicom_seg(path: str | os.PathLike, labels: np.ndarray, headers: Sequence, *, kind: str = "vessels",
                    software_version: str = "unknown") -> Path:
    """Write ``labels`` (int (H, W, D): 0 background, else the segment number of ``SEGMENTS[kind]``)
    as a DICOM-SEG referencing ``headers`` (pydicom Datasets, one per slice, in the array's order).

    ValueError when the array does not match the series (slice count, rows, columns).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (H, W, D), got shape {labels.shape}")
    h, w, d = labels.shape
    if len(headers) != d:
        raise ValueError(f"{d} slices in the mask but {len(headers)} DICOM files in the series")
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    if (rows, cols) != (h, w):
        raise ValueError(f"mask slices are {h} x {w}, the series' images {rows} x {cols}")
    software_version = short_version(software_version)
    algorithm = hd.AlgorithmIdentificationSequence(name="livervessel CAS", version=software_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=getattr(codes.SCT, code),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Liver], display_color=hd.color.CIELabColor.from_rgb(*rgb))
        for number, label, code, rgb in SEGMENTS[kind]
    ]
    # a series without one gets the same UID every time, derived from its SeriesInstanceUID
    frame_of_reference = str(getattr(headers[0], "FrameOfReferenceUID", "") or
                             generate_uid(entropy_srcs=[str(getattr(headers[0], "SeriesInstanceUID", "")), "FoR"]))
    frames = np.ascontiguousarray(np.moveaxis(labels, 2, 0)).astype(np.uint8)  # (D, H, W), frame k = slice k
    seg = hd.seg.Segmentation(
        source_images=[_complete(h, frame_of_reference) for h in headers], pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="livervessel",
        manufacturer_model_name="connectivity-aware salience vessel segmentation",
        software_versions=software_version, device_serial_number="none", omit_empty_frames=False,
        series_description="liver vessels (automatic)")
    seg.save_as(str(path))
    return Path(path)
