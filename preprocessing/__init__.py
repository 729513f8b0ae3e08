"""Raw CT (3D-IRCADb-style DICOM or NIfTI) -> the project's HDF5 layout (docs/DESIGN.md section 2)."""
from preprocessing.dicom_reader import PatientData, read_dicom_patient
from preprocessing.errors import PreprocessError
from preprocessing.nifti_reader import read_nifti_case
from preprocessing.pipeline import Summary, case_name, crop_box, make_split, preprocess

__all__ = [
    "PatientData",
    "PreprocessError",
    "Summary",
    "case_name",
    "crop_box",
    "make_split",
    "preprocess",
    "read_dicom_patient",
    "read_nifti_case",
]
