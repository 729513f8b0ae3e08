"""preprocess.py: DICOM (folders, zips) and NIfTI -> HDF5 layout; bad input; splits and lists.

Patients are small synthetic arrays written with phantom.dicom_io.write_patient, so every
expected value is computed here from what was written.
"""
from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path

import json

import h5py
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import preprocess as cli
from phantom.dicom_io import series_bytes, write_patient
from preprocessing import crop_box, make_split, preprocess, read_dicom_patient
from tests.conftest import REAL_SERIES
from utils.h5io import DatasetPaths, read_list, read_volume, slice_name, write_list

SPACING = (0.7, 0.8, 1.6)
SHAPE = (24, 20, 10)
LIVER_Z = (2, 8)  # liver present on slices 2..7


def synth(seed: int, shape=SHAPE, vessel_names=("portalvein", "venoussystem")) -> dict:
    """HU (int16, both signs and > 400 so the window matters) and {0, 1} masks."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1100, 1600, shape).astype(np.int16)
    liver = np.zeros(shape, np.uint8)
    liver[4:20, 3:15, LIVER_Z[0] : LIVER_Z[1]] = 1
    masks = {"liver": liver, "artery": (rng.random(shape) > 0.95).astype(np.uint8)}
    for name in vessel_names:
        masks[name] = ((rng.random(shape) > 0.9) & (liver > 0)).astype(np.uint8)
    return {"hu": hu, "masks": masks}


def make_patient(src: Path, n: int, seed: int | None = None, *, unsigned=False, zip_output=False, **kw) -> dict:
    p = synth(n if seed is None else seed, **kw)
    write_patient(src / f"3Dircadb1.{n}", p["hu"], p["masks"], SPACING, unsigned_intercept=unsigned, zip_output=zip_output)
    return p


def window(hu: np.ndarray) -> np.ndarray:
    return np.clip(hu.astype(np.float32), 0, 400) / np.float32(400)


def run(tmp_path: Path, dataset="3D-IRCADb", src=None, **kw):
    root, lists = tmp_path / "data", tmp_path / "list"
    summary = preprocess(dataset, src if src is not None else tmp_path / "src", root, lists, **kw)
    return summary, DatasetPaths.of(root, dataset, lists)


def leftovers(paths: DatasetPaths, case: str) -> list[Path]:
    """Every file of ``case`` under the dataset root, temporary names included."""
    return [p for p in paths.root.rglob("*") if p.is_file() and case in p.name]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("zip_output", [False, True])
def test_round_trip(tmp_path, unsigned, zip_output):
    # patient 1 is a training case and 4 a test case of the 3D-IRCADb seed split
    pats = {n: make_patient(tmp_path / "src", n, unsigned=unsigned, zip_output=zip_output) for n in (1, 4)}
    summary, paths = run(tmp_path)
    assert summary.written == ["case0001", "case0004"] and summary.ok
    assert read_list(paths.list_file("vol_train"))[:3] == ["case0001", "case0002", "case0003"]
    assert read_list(paths.list_file("vol_test")) == ["case0004", "case0008", "case0013", "case0016", "case0018"]
    for n, p in pats.items():
        vol = read_volume(paths.volume(f"case{n:04d}"))
        z = slice(*LIVER_Z)
        np.testing.assert_array_equal(vol.image, window(p["hu"])[:, :, z])
        union = (p["masks"]["portalvein"] | p["masks"]["venoussystem"])[:, :, z]
        np.testing.assert_array_equal(vol.label, union)
        np.testing.assert_array_equal(vol.liver, p["masks"]["liver"][:, :, z])
        assert vol.spacing == pytest.approx(SPACING, abs=1e-6)
        assert vol.crop == (0, SHAPE[0], 0, SHAPE[1], LIVER_Z[0], LIVER_Z[1])
        assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
    # slices only for the training case, indexed along D of the stored volume
    vol1 = read_volume(paths.volume("case0001"))
    names = read_list(paths.list_file("slice_train"))
    assert names == [slice_name("case0001", k) for k in range(LIVER_Z[1] - LIVER_Z[0])]
    with h5py.File(paths.slice(names[3]), "r") as f:
        np.testing.assert_array_equal(f["image"][()], vol1.image[:, :, 3])
        np.testing.assert_array_equal(f["label"][()], vol1.label[:, :, 3])
    assert not list(paths.slice_data.glob("case0004_*"))


def test_slice_order_from_positions_not_file_names(tmp_path):
    p = make_patient(tmp_path / "src", 1)
    pdir = tmp_path / "src" / "3Dircadb1.1"
    d = SHAPE[2]
    for folder in [pdir / "PATIENT_DICOM", *(pdir / "MASKS_DICOM").iterdir()]:
        for i in range(d):  # reverse the file numbering: image_0 now holds the top slice
            (folder / f"image_{i}").rename(folder / f"tmp_{d - 1 - i}")
        for i in range(d):
            (folder / f"tmp_{i}").rename(folder / f"image_{i}")
    data = read_dicom_patient(pdir, ["portalvein"])
    np.testing.assert_array_equal(data.hu, p["hu"].astype(np.float32))
    np.testing.assert_array_equal(data.label, p["masks"]["portalvein"])


def test_instance_number_fallback_and_gap_warning(tmp_path, caplog):
    p = make_patient(tmp_path / "src", 1)
    pdir = tmp_path / "src" / "3Dircadb1.1"
    files = sorted((pdir / "PATIENT_DICOM").iterdir())
    for f in files:  # no positions; InstanceNumber reversed relative to file index
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.InstanceNumber = 100 - int(f.name.split("_")[1])
        ds.save_as(f)
    data = read_dicom_patient(pdir, [], with_masks=False)
    np.testing.assert_array_equal(data.hu, p["hu"][:, :, ::-1].astype(np.float32))
    assert data.spacing == pytest.approx(SPACING)  # from SliceThickness

    q = make_patient(tmp_path / "src2", 2)
    qdir = tmp_path / "src2" / "3Dircadb1.2"
    for folder in [qdir / "PATIENT_DICOM", *(qdir / "MASKS_DICOM").iterdir()]:
        (folder / "image_5").unlink()
    with caplog.at_level(logging.WARNING):
        data = read_dicom_patient(qdir, ["portalvein"])
    assert "uneven slice spacing" in caplog.text
    keep = [i for i in range(SHAPE[2]) if i != 5]
    np.testing.assert_array_equal(data.hu, q["hu"][:, :, keep].astype(np.float32))
    np.testing.assert_array_equal(data.label, q["masks"]["portalvein"][:, :, keep])
    assert data.spacing[2] == pytest.approx(1.6)


def test_venacava_alias_and_missing_mask_warning(tmp_path, caplog):
    p = make_patient(tmp_path / "src", 1, vessel_names=("venacava",))
    with caplog.at_level(logging.WARNING):
        summary, paths = run(tmp_path, crop="none")
    assert summary.ok
    vol = read_volume(paths.volume("case0001"))
    np.testing.assert_array_equal(vol.label, p["masks"]["venacava"])
    assert vol.attrs["label_masks"] == "venacava"
    # portalvein is missing: the warning lists what the patient has
    assert "3Dircadb1.1: no mask folder portalvein; the patient has: artery, liver, venacava" in caplog.text


def test_crop_box_worked_examples():
    liver = np.zeros((10, 12, 8), np.uint8)
    liver[3:6, 4:9, 2:5] = 1
    assert crop_box(liver, liver.shape, "liver_z", 0) == (0, 10, 0, 12, 2, 5)
    assert crop_box(liver, liver.shape, "liver_z", 3) == (0, 10, 0, 12, 0, 8)
    assert crop_box(liver, liver.shape, "liver_box", 1) == (2, 7, 3, 10, 1, 6)
    assert crop_box(liver, liver.shape, "none", 1) == (0, 10, 0, 12, 0, 8)
    assert crop_box(None, liver.shape, "liver_box", 1) == (0, 10, 0, 12, 0, 8)


def test_liver_box_crop_end_to_end(tmp_path):
    p = make_patient(tmp_path / "src", 4)
    summary, paths = run(tmp_path, crop="liver_box", margin=1)
    vol = read_volume(paths.volume("case0004"))
    assert vol.crop == (3, 21, 2, 16, 1, 9)
    np.testing.assert_array_equal(vol.image, window(p["hu"])[3:21, 2:16, 1:9])


# ---------------------------------------------------------------- bad input


def _replace_slice(pdir: Path, i: int, shape=SHAPE[:2], z_index=None):
    vol = np.zeros(shape + (1,), np.int16)
    z = (i if z_index is None else z_index) * SPACING[2]
    (pdir / "PATIENT_DICOM" / f"image_{i}").write_bytes(series_bytes(vol, SPACING, z0=z)[0])


def _set_modality(pdir: Path):
    for f in (pdir / "PATIENT_DICOM").iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)


def _truncate_zip(pdir: Path):
    z = pdir / "PATIENT_DICOM.zip"
    z.write_bytes(z.read_bytes()[:-200])


def _corrupt_zip_member(pdir: Path):
    z = pdir / "PATIENT_DICOM.zip"
    with zipfile.ZipFile(z) as a:
        members = {n: a.read(n) for n in a.namelist()}
    members["PATIENT_DICOM/image_3"] = members["PATIENT_DICOM/image_3"][:300]
    with zipfile.ZipFile(z, "w") as a:
        for n, b in members.items():
            a.writestr(n, b)


BAD = {
    "corrupted": (lambda d: (d / "PATIENT_DICOM" / "image_3").write_bytes(b"\x00garbage" * 50), "image_3: not a readable DICOM"),
    "truncated": (
        lambda d: (d / "PATIENT_DICOM" / "image_3").write_bytes((d / "PATIENT_DICOM" / "image_3").read_bytes()[:-100]),
        "image_3: pixel data unreadable",
    ),
    "sizes": (lambda d: _replace_slice(d, 3, shape=(24, 22)), "image_3: slice size 24x22 differs from 24x20"),
    "duplicate": (lambda d: _replace_slice(d, 3, z_index=2), "duplicate slice position 3.200 mm"),
    "no_patient_dicom": (lambda d: (d / "PATIENT_DICOM").rename(d / "CT"), "no PATIENT_DICOM folder or PATIENT_DICOM.zip (has: CT, MASKS_DICOM)"),
    "non_ct": (_set_modality, "Modality is 'MR', expected CT"),
    "empty_folder": (lambda d: [shutil.rmtree(d), d.mkdir()], "empty folder, no PATIENT_DICOM"),
    "empty_series": (lambda d: [f.unlink() for f in (d / "PATIENT_DICOM").iterdir()], "PATIENT_DICOM: no DICOM files"),
    "mask_count": (
        lambda d: (d / "MASKS_DICOM" / "portalvein" / "image_9").unlink(),
        "mask 'portalvein' has 9 slices, the image 10",
    ),
    # without masks its volume would be all background (--no-masks reads such scans)
    "no_masks": (lambda d: shutil.rmtree(d / "MASKS_DICOM"), "no MASKS_DICOM folder or zip (preprocess.py --no-masks"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_fails_that_patient_only(tmp_path, kind):
    corrupt, expected = BAD[kind]
    make_patient(tmp_path / "src", 1)
    make_patient(tmp_path / "src", 2)  # a training case: it must get no slices either
    corrupt(tmp_path / "src" / "3Dircadb1.2")
    summary, paths = run(tmp_path)
    assert summary.written == ["case0001"]
    assert [c for c, _ in summary.failed] == ["case0002"]
    msg = summary.failed[0][1]
    assert msg.startswith("3Dircadb1.2: ") and expected in msg and "\n" not in msg
    assert leftovers(paths, "case0002") == []
    assert read_list(paths.list_file("slice_train")) == [slice_name("case0001", k) for k in range(6)]


def test_cases_made_with_other_options_are_not_reused(tmp_path):
    """A first run stopped before its dataset.json, then another crop: the cases are converted
    again, not taken as complete; and a case that fails in an --overwrite run keeps no old output."""
    make_patient(tmp_path / "src", 1)
    make_patient(tmp_path / "src", 2)
    summary, paths = run(tmp_path, crop="liver_z")
    cropped = read_volume(paths.volume("case0001")).image.shape
    (paths.root / "dataset.json").unlink()  # as if the run had stopped before writing it
    summary, paths = run(tmp_path, crop="none")
    assert summary.written == ["case0001", "case0002"] and summary.skipped == []
    assert read_volume(paths.volume("case0001")).image.shape[2] > cropped[2]
    assert run(tmp_path, crop="none")[0].skipped == ["case0001", "case0002"]  # the same options: reused
    BAD["truncated"][0](tmp_path / "src" / "3Dircadb1.2")
    summary, paths = run(tmp_path, crop="liver_z", overwrite=True)
    assert summary.written == ["case0001"] and [c for c, _ in summary.failed] == ["case0002"]
    assert leftovers(paths, "case0002") == []


@pytest.mark.parametrize("corrupt,expected", [(_truncate_zip, "PATIENT_DICOM.zip: not a readable zip"),
                                              (_corrupt_zip_member, "PATIENT_DICOM.zip:PATIENT_DICOM/image_3")])
def test_bad_zip_input(tmp_path, corrupt, expected):
    make_patient(tmp_path / "src", 1, zip_output=True)
    make_patient(tmp_path / "src", 2, zip_output=True)
    corrupt(tmp_path / "src" / "3Dircadb1.2")
    summary, paths = run(tmp_path)
    assert summary.written == ["case0001"] and expected in summary.failed[0][1]
    assert leftovers(paths, "case0002") == []


def test_cli_exit_code_and_workers(tmp_path, capsys):
    for n in (1, 2, 3):
        make_patient(tmp_path / "src", n)
    (tmp_path / "src" / "3Dircadb1.3" / "PATIENT_DICOM" / "image_0").write_bytes(b"nope")
    argv = ["--dataset", "3D-IRCADb", "--src", str(tmp_path / "src"), "--root_path", str(tmp_path / "data"),
            "--list_dir", str(tmp_path / "list"), "--workers", "2"]
    assert cli.main(argv) == 1  # main() configures logging itself, to stderr
    assert "ERROR preprocessing.pipeline: 3Dircadb1.3: PATIENT_DICOM/image_0: not a readable DICOM file" in capsys.readouterr().err
    paths = DatasetPaths.of(tmp_path / "data", "3D-IRCADb", tmp_path / "list")
    assert sorted(p.name for p in paths.vol_data.iterdir()) == ["case0001.h5", "case0002.h5"]
    shutil.rmtree(tmp_path / "src" / "3Dircadb1.3")
    assert cli.main(argv) == 0  # the other two are complete: skipped
    assert cli.main(argv + ["--src", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------- re-runs, splits, lists


def test_rerun_skips_complete_and_redoes_incomplete(tmp_path):
    make_patient(tmp_path / "src", 1)
    s1, paths = run(tmp_path)
    assert s1.written == ["case0001"]
    mtime = paths.volume("case0001").stat().st_mtime_ns
    s2, _ = run(tmp_path)
    assert s2.skipped == ["case0001"] and paths.volume("case0001").stat().st_mtime_ns == mtime
    paths.slice(slice_name("case0001", 2)).unlink()
    s3, _ = run(tmp_path)
    assert s3.written == ["case0001"] and paths.slice(slice_name("case0001", 2)).is_file()
    s4, _ = run(tmp_path, overwrite=True, crop="none")
    assert s4.written == ["case0001"]
    assert len(list(paths.slice_data.glob("case0001_slice*.h5"))) == SHAPE[2]


def test_split_deterministic_partition():
    cases = [f"case{i:04d}" for i in range(1, 21)]
    a, b, c = make_split(cases, seed=3), make_split(list(reversed(cases)), seed=3), make_split(cases, seed=4)
    assert a == b and a != c
    assert [len(a[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(a["train"] + a["val"] + a["test"]) == cases
    assert [len(v) for v in make_split(cases[:3]).values()] == [1, 1, 1]


def test_generated_and_existing_lists(tmp_path, caplog):
    for n in (1, 2, 3, 4, 5):
        make_patient(tmp_path / "src", n, shape=(8, 8, 10))
    s, paths = run(tmp_path, dataset="phantom", crop="none", split_seed=7)
    expected = make_split([f"case{n:04d}" for n in range(1, 6)], seed=7)
    assert {k: read_list(paths.list_file(f"vol_{k}")) for k in expected} == expected
    assert len(read_list(paths.list_file("slice_train"))) == 10 * len(expected["train"])
    # hand-made lists are kept without --overwrite, and slices follow them
    mine = {"train": ["case0005"], "val": ["case0001", "case0002"], "test": ["case0003", "case0004"]}
    for k, v in mine.items():
        write_list(paths.list_file(f"vol_{k}"), v)
    run(tmp_path, dataset="phantom", crop="none", overwrite=True)  # rewrites: back to the seeded split
    assert read_list(paths.list_file("vol_train")) == make_split([f"case{n:04d}" for n in range(1, 6)], seed=0)["train"]
    for k, v in mine.items():
        write_list(paths.list_file(f"vol_{k}"), v)
    with caplog.at_level(logging.INFO):
        run(tmp_path, dataset="phantom", crop="none", split_seed=3)
    assert {k: read_list(paths.list_file(f"vol_{k}")) for k in mine} == mine
    # the kept lists win over --split-seed: said, not silent
    assert f"{paths.list_dir}: using the split lists there (--split and --split-seed make new lists only" in caplog.text
    assert read_list(paths.list_file("slice_train")) == [slice_name("case0005", k) for k in range(10)]


def test_shipped_3dircadb_lists_match_seed_split():
    repo = Path(__file__).resolve().parents[1]
    lists = {k: read_list(repo / "list" / "3D-IRCADb" / f"vol_{k}.txt") for k in ("train", "val", "test")}
    assert lists["train"] == [f"case{i:04d}" for i in (1, 2, 3, 5, 6, 11, 12, 14, 17, 20)]
    assert lists["val"] == [f"case{i:04d}" for i in (7, 9, 10, 15, 19)]
    assert lists["test"] == [f"case{i:04d}" for i in (4, 8, 13, 16, 18)]


# ---------------------------------------------------------------- NIfTI


def _write_nifti(path: Path, arr_hwd: np.ndarray, spacing, orient: str):
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_hwd.transpose(2, 0, 1)))  # (z, y, x)
    img.SetSpacing((spacing[1], spacing[0], spacing[2]))  # sitk spacing is (x, y, z) = (col, row, slice)
    sitk.WriteImage(sitk.DICOMOrient(img, orient), str(path))  # stored flipped: the reader must undo it


def test_nifti_and_dicom_give_identical_arrays(tmp_path):
    p = make_patient(tmp_path / "src", 1)
    vessel = p["masks"]["portalvein"] | p["masks"]["venoussystem"]
    tumour = (p["masks"]["artery"] > 0) & (vessel == 0)
    lab = (vessel + 2 * tumour).astype(np.uint8)  # MSD Task08: 1 vessel, 2 tumour
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    _write_nifti(tmp_path / "imagesTr" / "hepaticvessel_001_0000.nii.gz", p["hu"], SPACING, "RAS")
    _write_nifti(tmp_path / "labelsTr" / "hepaticvessel_001.nii.gz", lab, SPACING, "RAS")
    s_dcm, p_dcm = run(tmp_path, dataset="dcm", crop="none")
    s_nii, p_nii = run(tmp_path, dataset="nii", fmt="nifti", images=tmp_path / "imagesTr", labels=tmp_path / "labelsTr")
    assert s_dcm.written == ["case0001"] and s_nii.written == ["hepaticvessel_001"]
    a, b = read_volume(p_dcm.volume("case0001")), read_volume(p_nii.volume("hepaticvessel_001"))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert b.label.sum() == vessel.sum()  # tumour (2) is not vessel
    # NIfTI liver labels named as the liver make a liver model's data, as DICOM's liver folder does;
    # every non-zero value is liver (its tumours too)
    import preprocess as cli
    from inference.liver import model_target

    assert cli.main(["--dataset", "nii_liver", "--root_path", str(tmp_path / "data"), "--list_dir",
                     str(tmp_path / "list"), "--format", "nifti", "--images", str(tmp_path / "imagesTr"),
                     "--labels", str(tmp_path / "labelsTr"), "--vessels", "liver"]) == 0
    p_liv = DatasetPaths.of(tmp_path / "data", "nii_liver", tmp_path / "list")
    assert read_volume(p_liv.volume("hepaticvessel_001")).label.sum() == (lab > 0).sum() > vessel.sum()
    doc = json.loads((p_liv.root / "dataset.json").read_text())
    assert doc["vessel_classes"] == ["liver"] and model_target({"manifests": {"dataset": doc}}) == "liver"
    assert model_target({"manifests": {"dataset": json.loads((p_nii.root / "dataset.json").read_text())}}) == "vessels"
    assert a.spacing == pytest.approx(b.spacing, abs=1e-6)
    assert b.crop == (0, SHAPE[0], 0, SHAPE[1], 0, SHAPE[2])


def test_nifti_bad_file_fails_that_case(tmp_path):
    p = synth(1)
    for d in ("im", "lb"):
        (tmp_path / d).mkdir()
    for name in ("a", "b"):
        _write_nifti(tmp_path / "im" / f"{name}.nii.gz", p["hu"], SPACING, "LPS")
        _write_nifti(tmp_path / "lb" / f"{name}.nii.gz", p["masks"]["portalvein"], SPACING, "LPS")
    (tmp_path / "lb" / "b.nii.gz").write_bytes(b"broken")
    s, paths = run(tmp_path, dataset="nii", fmt="nifti", images=tmp_path / "im", labels=tmp_path / "lb")
    assert s.written == ["a"] and s.failed[0][0] == "b" and "lb/b.nii.gz: not a readable NIfTI file" in s.failed[0][1]
    assert sorted(q.name for q in paths.vol_data.iterdir()) == ["a.h5"]


def test_nifti_cases_not_in_hu_flat_or_with_a_shifted_label_fail(tmp_path):
    # an image scaled to [0, 1] (the HU window would make it zeros), a single slice, and a label
    # moved 40 mm from its image each fail their case with the file named; a good case is written
    p = synth(1)
    for d in ("im", "lb"):
        (tmp_path / d).mkdir()
    hu = p["hu"].astype(np.float32)
    lab = p["masks"]["portalvein"]
    cases = {"good": (hu, lab), "scaled": ((hu - hu.min()) / (hu.max() - hu.min()), lab),
             "flat": (hu[:, :, :1], lab[:, :, :1]), "shifted": (hu, lab)}
    for name, (im, lb) in cases.items():
        _write_nifti(tmp_path / "im" / f"{name}.nii.gz", im, SPACING, "LPS")
        _write_nifti(tmp_path / "lb" / f"{name}.nii.gz", lb, SPACING, "LPS")
    moved = sitk.ReadImage(str(tmp_path / "lb" / "shifted.nii.gz"))
    moved.SetOrigin(tuple(np.asarray(moved.GetOrigin()) + (40.0, 0.0, 0.0)))
    sitk.WriteImage(moved, str(tmp_path / "lb" / "shifted.nii.gz"))
    s, paths = run(tmp_path, dataset="nii", fmt="nifti", images=tmp_path / "im", labels=tmp_path / "lb")
    failed = dict(s.failed)
    assert s.written == ["good"] and sorted(failed) == ["flat", "scaled", "shifted"]
    # NaN outside the field of view (some converters write it; SimpleITK's writer stores 0 there)
    from preprocessing.errors import PreprocessError
    from preprocessing.nifti_reader import check_ct
    holes = hu.copy()
    holes[0, 0, :] = np.nan
    with pytest.raises(PreprocessError, match="holes.nii.gz: 10 voxels are NaN or infinite"):
        check_ct("holes", "holes.nii.gz", holes)
    check_ct("good", "good.nii.gz", hu)
    assert "im/scaled.nii.gz: values span [0, 1]: not a CT in Hounsfield units" in failed["scaled"]
    assert "im/flat.nii.gz: a 2-D image" in failed["flat"]
    assert "lb/shifted.nii.gz: label geometry (spacing / direction / origin) differs" in failed["shifted"]


# ---------------------------------------------------------------- phantom generator (contract 5)


def test_generator_tiny_round_trip(tmp_path):
    gen = pytest.importorskip("phantom.generator")
    pats = {n: gen.generate_patient(n, seed=0, preset="tiny") for n in (3, 4)}  # 3: unsigned intercept
    for n, pat in pats.items():
        write_patient(tmp_path / "src" / f"3Dircadb1.{n}", pat.hu, pat.masks, pat.spacing,
                      unsigned_intercept=pat.unsigned_intercept, zip_output=(n == 4))
    assert pats[3].unsigned_intercept and not pats[4].unsigned_intercept
    summary, paths = run(tmp_path)
    assert summary.ok
    for n, pat in pats.items():
        vol = read_volume(paths.volume(f"case{n:04d}"))
        zs = np.flatnonzero(pat.masks["liver"].any(axis=(0, 1)))
        z = slice(int(zs[0]), int(zs[-1]) + 1)
        np.testing.assert_array_equal(vol.image, window(pat.hu)[:, :, z])
        np.testing.assert_array_equal(vol.label, (pat.masks["portalvein"] | pat.masks["venoussystem"])[:, :, z])
        assert vol.spacing == pytest.approx(tuple(pat.spacing), abs=1e-5)
        assert vol.crop == (0, pat.hu.shape[0], 0, pat.hu.shape[1], z.start, z.stop)


# ---------------------------------------------------------------- the real series


def _intact(f: Path) -> bool:
    """Reference check, independent of the reader: the pixel data is as long as the header says."""
    ds = pydicom.dcmread(f)
    return len(ds.PixelData) == ds.Rows * ds.Columns * ds.BitsAllocated // 8


@pytest.mark.skipif(not REAL_SERIES.is_dir(), reason="real 3D-IRCADb series not available")
def test_real_series_image_only(tmp_path):
    files = sorted(REAL_SERIES.iterdir(), key=lambda f: int(f.name.split("_")[1]))
    assert len(files) == 129
    damaged = {f.name for f in files if not _intact(f)}
    for k, v in {"train": [], "val": [], "test": ["case0001"]}.items():  # a test case: no slice files
        write_list(tmp_path / "list" / "real" / f"vol_{k}.txt", v)

    def link(folder: str, chosen: list[Path]) -> Path:
        """A patient folder of symlinks: the real files are read in place, never copied."""
        d = tmp_path / folder / "3Dircadb1.1" / "PATIENT_DICOM"
        d.mkdir(parents=True)
        for f in chosen:
            (d / f.name).symlink_to(f)
        return d.parent

    if damaged:
        # the series as it is: the damaged file fails the patient with one line naming it, no output
        summary, paths = run(tmp_path, dataset="real", src=link("whole", files).parent, with_masks=False)
        first_bad = next(f.name for f in files if f.name in damaged)
        assert f"3Dircadb1.1: PATIENT_DICOM/{first_bad}: pixel data unreadable" in summary.failed[0][1]
        assert not paths.volume("case0001").exists()
    intact = [f for f in files if f.name not in damaged]
    data = read_dicom_patient(link("intact", intact), [], with_masks=False)
    assert data.hu.shape == (512, 512, len(intact))
    assert np.round(data.spacing, 2).tolist() == [0.57, 0.57, 1.6]
    assert (data.hu.min(), data.hu.max()) == (-1024, 1023)
    # image-only conversion, on 24 consecutive intact slices to keep the test fast (gzip dominates)
    run_start = next(k for k in range(len(files) - 24) if not damaged & {f.name for f in files[k : k + 24]})
    part = files[run_start : run_start + 24]
    summary, paths = run(tmp_path, dataset="real", src=link("part", part).parent, with_masks=False)
    assert summary.written == ["case0001"]
    vol = read_volume(paths.volume("case0001"))
    assert vol.crop == (0, 512, 0, 512, 0, 24) and not vol.label.any() and vol.liver is None
    assert np.round(vol.spacing, 2).tolist() == [0.57, 0.57, 1.6]
    k0 = intact.index(part[0])
    np.testing.assert_array_equal(vol.image, window(data.hu[:, :, k0 : k0 + 24]))


def test_nifti_label_values():
    from preprocessing.errors import PreprocessError
    from preprocessing.nifti_reader import vessel_from_labels

    msd = np.array([[0, 1], [2, 1]])
    np.testing.assert_array_equal(vessel_from_labels("c", Path("l.nii"), msd, None), [[0, 1], [0, 1]])
    livs = np.array([[0, 255], [255, 0]])
    np.testing.assert_array_equal(vessel_from_labels("c", Path("l.nii"), livs, None), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(vessel_from_labels("c", Path("l.nii"), msd, (1, 2)), [[0, 1], [1, 1]])
    with pytest.raises(PreprocessError, match=r"c: l.nii: label values \[0, 3, 7\] not recognised"):
        vessel_from_labels("c", Path("l.nii"), np.array([0, 3, 7]), None)


# ---------------------------------------------------------------- stage manifests


def test_dataset_manifest_records_options_and_cases_and_refuses_other_options(tmp_path):
    from utils import manifests

    make_patient(tmp_path / "src", 1)
    make_patient(tmp_path / "src", 4)
    _, paths = run(tmp_path)
    doc = json.loads((paths.root / "dataset.json").read_text())
    assert doc["format"] == manifests.DATASET_FORMAT and doc["input_format"] == "dicom"
    assert doc["vessel_classes"] == ["portalvein", "venoussystem"] and doc["hu_window"] == [0.0, 400.0]
    assert doc["crop"] == {"mode": "liver_z", "margin": 0} and doc["source"] == str((tmp_path / "src").resolve())
    assert set(doc["cases"]) == {"case0001", "case0004"}
    vol = read_volume(paths.volume("case0001"))
    c1 = doc["cases"]["case0001"]
    assert c1["shape"] == list(vol.image.shape) and c1["crop"] == list(vol.crop)
    assert c1["spacing"] == pytest.approx(list(SPACING))
    # the same options again: skipped, and the manifest's content (not its date) is the same
    run(tmp_path)
    again = json.loads((paths.root / "dataset.json").read_text())
    assert manifests.fingerprint(again) == manifests.fingerprint(doc)
    # other options would mix cases made two ways: refused, naming the option; --overwrite redoes it
    with pytest.raises(ValueError, match=r"dataset.json: the dataset there was made with other options \(crop:"):
        run(tmp_path, crop="none")
    run(tmp_path, crop="none", overwrite=True)
    redone = json.loads((paths.root / "dataset.json").read_text())
    assert redone["crop"]["mode"] == "none" and redone["cases"]["case0001"]["shape"] == list(SHAPE)


def test_training_refuses_manifests_that_disagree(tmp_path, capsys, monkeypatch):
    """Maps made from another dataset.json, or a dataset.json with another HU window, or a salience
    run stopped midway, stop main.py with one line naming the file and the field."""
    import main as main_cli
    import salience_generation as sg
    from utils import manifests

    make_patient(tmp_path / "src", 1)
    make_patient(tmp_path / "src", 7)
    _, paths = run(tmp_path)
    lists = {"vol_train": "case0001\n", "vol_val": "case0007\n", "vol_test": ""}  # the lists name 20 patients
    for name, text in lists.items():
        (paths.list_dir / f"{name}.txt").write_text(text)
    sg.run("3D-IRCADb", str(tmp_path / "data"), str(tmp_path / "list"), "analytic")
    sal = json.loads((paths.vol_salience / "manifest.json").read_text())
    assert sal["generator"]["kind"] == "analytic" and set(sal["cases"]) == {"case0001", "case0007"}
    dataset_json = paths.root / "dataset.json"
    assert sal["dataset_fingerprint"] == manifests.fingerprint(json.loads(dataset_json.read_text()))
    args = ["--dataset", "3D-IRCADb", "--root_path", str(tmp_path / "data"), "--list_dir", str(tmp_path / "list"),
            "--output_root", str(tmp_path / "ckpt"), "--model_kwargs", '{"base_channels": 4, "depth": 2}',
            "--img_size", "32", "32", "--batch_size", "2", "--num_workers", "0", "--max_iterations", "1"]
    doc = json.loads(dataset_json.read_text())

    def refused() -> str:
        capsys.readouterr()
        assert main_cli.main(args) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
        assert len(errors) == 1
        return errors[0]

    dataset_json.write_text(json.dumps({**doc, "vessel_classes": ["portalvein"]}))
    assert "vol_salience/manifest.json: dataset_fingerprint differs" in refused()
    dataset_json.write_text(json.dumps({**doc, "hu_window": [-100.0, 300.0]}))
    assert "dataset.json: hu_window [-100.0, 300.0] differs" in refused()
    dataset_json.write_text(json.dumps(doc))
    # the maps remade by another generator, stopped after the first case: the manifest still names
    # the analytic generator, so it is marked until a run completes
    real = sg.salience_3d
    made = []

    def stop_at_the_second(*a, **kw):
        if made:
            raise KeyboardInterrupt
        made.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(sg, "salience_3d", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        sg.run("3D-IRCADb", str(tmp_path / "data"), str(tmp_path / "list"), "bank", overwrite=True)
    monkeypatch.setattr(sg, "salience_3d", real)
    assert "vol_salience/manifest.json: salience_generation.py did not finish" in refused()
    sg.run("3D-IRCADb", str(tmp_path / "data"), str(tmp_path / "list"), "analytic", overwrite=True)
    assert main_cli.main(args) == 0
    run_dir = next((tmp_path / "ckpt").rglob("best_model.pth")).parent
    assert json.loads((run_dir / "dataset.json").read_text()) == doc


def test_vessel_classes_store_a_class_map_beside_the_binary_label(tmp_path):
    """--vessel_classes portalvein,venoussystem: 1 portal, 2 hepatic, the portal vein winning a voxel
    both masks claim; the binary label stays their union; slices and the manifest carry it."""
    p = make_patient(tmp_path / "src", 1)
    _, paths = run(tmp_path, vessel_classes=["portalvein", "venoussystem"])
    vol = read_volume(paths.volume("case0001"))
    z = slice(*LIVER_Z)
    pv, vs = p["masks"]["portalvein"][:, :, z] > 0, p["masks"]["venoussystem"][:, :, z] > 0
    assert (pv & vs).any()  # the synthetic masks overlap: the rule decides those voxels
    np.testing.assert_array_equal(vol.classes, np.where(pv, 1, np.where(vs, 2, 0)))
    np.testing.assert_array_equal(vol.label, (pv | vs).astype(np.uint8))
    assert vol.attrs["class_names"] == "portalvein,venoussystem"
    with h5py.File(paths.slice(slice_name("case0001", 3)), "r") as f:
        np.testing.assert_array_equal(f["classes"][()], vol.classes[:, :, 3])
    doc = json.loads((paths.root / "dataset.json").read_text())
    assert doc["class_map"]["classes"] == ["portalvein", "venoussystem"] and doc["class_map"]["background"] == 0
    # the binary default is another dataset: refused unless --overwrite, which stores no class map
    with pytest.raises(ValueError, match="class_map"):
        run(tmp_path)
    run(tmp_path, overwrite=True)
    assert read_volume(paths.volume("case0001")).classes is None
    with pytest.raises(ValueError, match="--vessel_classes needs DICOM input"):
        preprocess("x", None, tmp_path / "d2", tmp_path / "l2", fmt="nifti", images=tmp_path, labels=tmp_path,
                   vessel_classes=["portalvein"])
    # a class outside the binary label's vessels: its union would not be the label (an alias counts)
    with pytest.raises(ValueError, match="venoussystem not in --vessels portalvein"):
        preprocess("x", tmp_path / "src", tmp_path / "d3", tmp_path / "l3", vessels=["portalvein"],
                   vessel_classes=["portalvein", "venoussystem"])
    assert not (tmp_path / "d3").exists()


@pytest.mark.parametrize("extra,message", [
    (["--src", "s", "--images", "i"], "--images does not apply to --format dicom"),
    (["--src", "s", "--label-values", "1", "--labels", "l"], "--labels, --label-values do not apply to --format dicom"),
    (["--format", "nifti", "--images", "i", "--labels", "l", "--vessels", "artery"],
     "--vessels does not apply to --format nifti"),
    (["--format", "nifti", "--images", "i", "--src", "s"], "--src does not apply to --format nifti"),
    (["--src", "s", "--crop", "none", "--margin", "4"], "--margin widens the liver crop; --crop none keeps the whole"),
])
def test_options_the_format_or_crop_does_not_read_are_usage_errors(extra, message, tmp_path, capsys):
    import preprocess as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--dataset", "d", "--root_path", str(tmp_path / "out"), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_nifti_cases_pair_images_and_labels_by_name(tmp_path):
    from preprocessing.nifti_reader import find_nifti_cases

    def files(folder, names):
        (tmp_path / folder).mkdir()
        for n in names:
            (tmp_path / folder / n).write_bytes(b"")

    # nnU-Net: images carry the channel suffix, labels do not; case numbers of four digits stay
    files("imagesTr", ["liver_0001_0000.nii.gz", "liver_0002_0000.nii.gz"])
    files("labelsTr", ["liver_0001.nii.gz", "liver_0002.nii.gz"])
    found = find_nifti_cases(tmp_path / "imagesTr", tmp_path / "labelsTr")
    assert [(c, i.name, lab.name) for c, i, lab in found] == \
        [("liver_0001", "liver_0001_0000.nii.gz", "liver_0001.nii.gz"),
         ("liver_0002", "liver_0002_0000.nii.gz", "liver_0002.nii.gz")]
    # MSD: the same names; four-digit case numbers without a channel suffix
    files("img4", ["liver_0001.nii.gz", "liver_0002.nii"])
    files("lab4", ["liver_0001.nii.gz", "liver_0002.nii.gz"])
    assert [(c, lab.name) for c, _, lab in find_nifti_cases(tmp_path / "img4", tmp_path / "lab4")] == \
        [("liver_0001", "liver_0001.nii.gz"), ("liver_0002", "liver_0002.nii.gz")]
    # labels named exactly as the images: the same case names
    files("same_lab", ["liver_0001_0000.nii.gz", "liver_0002_0000.nii.gz"])
    assert [c for c, _, _ in find_nifti_cases(tmp_path / "imagesTr", tmp_path / "same_lab")] == \
        ["liver_0001", "liver_0002"]
    # an image without a label is named, not trained on as background; without labels none is needed
    (tmp_path / "labelsTr" / "liver_0002.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"liver_0002_0000.nii.gz: no label file liver_0002_0000.nii.gz or liver_0002"):
        find_nifti_cases(tmp_path / "imagesTr", tmp_path / "labelsTr")
    unlabelled = find_nifti_cases(tmp_path / "imagesTr", None)
    assert [c for c, _, lab in unlabelled if lab is None] == ["liver_0001", "liver_0002"]
    # an image without nnU-Net's channel suffix has one possible label name, said once
    files("plain_im", ["hepaticvessel_004.nii.gz"])
    files("no_lab", [])
    with pytest.raises(ValueError, match=r"hepaticvessel_004.nii.gz: no label file hepaticvessel_004.nii.gz in "):
        find_nifti_cases(tmp_path / "plain_im", tmp_path / "no_lab")


def test_patient_folders_leave_out_hidden_and_macos_folders(tmp_path):
    from preprocessing.pipeline import find_dicom_patients

    for name in ("3Dircadb1.10", "3Dircadb1.2", "__MACOSX", ".cache"):
        (tmp_path / name).mkdir()
    assert [p.name for p in find_dicom_patients(tmp_path)] == ["3Dircadb1.2", "3Dircadb1.10"]


# ---------------------------------------------------------------- where a stored volume lies


def _overlays(vol, source: sitk.Image) -> None:
    """The stored image, written as predictions are (evaluation.predictions.to_sitk with the volume's
    origin_mm and direction), lies on the source scan: the source resampled onto it is the image."""
    from evaluation.predictions import to_sitk

    written = to_sitk(vol.image, vol.spacing, vol.crop, vol.attrs["origin_mm"], vol.attrs["direction"])
    on_it = sitk.Resample(sitk.Cast(source, sitk.sitkFloat32), written, sitk.Transform(), sitk.sitkNearestNeighbor,
                          -5000.0)
    arr = np.transpose(sitk.GetArrayFromImage(on_it), (1, 2, 0))
    assert (arr > -5000).all()  # every voxel found in the source
    np.testing.assert_array_equal(window(arr), vol.image)


def test_stored_volumes_know_where_they_lie_in_the_source_scan(tmp_path):
    # DICOM with the liver crop (slices 2-7 of 10) and a NIfTI stored RAS at a far origin: both
    # stored volumes, written with their geometry, overlay their source scans voxel for voxel
    p = make_patient(tmp_path / "src", 1)
    _, paths = run(tmp_path)
    vol = read_volume(paths.volume("case0001"))
    assert vol.crop[4:] == LIVER_Z
    reader = sitk.ImageSeriesReader()
    series_dir = tmp_path / "src" / "3Dircadb1.1" / "PATIENT_DICOM"
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    _overlays(vol, reader.Execute())

    (tmp_path / "im").mkdir()
    img = sitk.GetImageFromArray(np.ascontiguousarray(p["hu"].transpose(2, 0, 1)))
    img.SetSpacing((SPACING[1], SPACING[0], SPACING[2]))
    img.SetOrigin((-180.5, -140.25, -612.0))
    ras = sitk.DICOMOrient(img, "RAS")
    sitk.WriteImage(ras, str(tmp_path / "im" / "far.nii.gz"))
    _, npaths = run(tmp_path, dataset="nii", fmt="nifti", images=tmp_path / "im", with_masks=False, crop="none")
    nvol = read_volume(npaths.volume("far"))
    assert nvol.attrs["origin_mm"] == pytest.approx(img.GetOrigin())
    _overlays(nvol, sitk.ReadImage(str(tmp_path / "im" / "far.nii.gz")))


@pytest.mark.parametrize("iop", [(-1.0, 0, 0, 0, 1, 0), (1.0, 0, 0, 0, 0, -1)], ids=["feet first", "coronal"])
def test_a_series_stored_out_of_lps_order_is_placed_where_it_lies(tmp_path, iop):
    # preprocess.py reorders such a series to LPS: the geometry it keeps is the reordered array's
    from tests.test_predict import oblique_series

    hu = np.random.default_rng(6).integers(-900, 300, size=(6, 7, 5)).astype(np.float32)
    series = tmp_path / "src" / "p1" / "PATIENT_DICOM"
    oblique_series(series, hu, (0.8, 0.6, 1.25), (-20.0, 14.0, 3.5), np.array(iop))
    _, paths = run(tmp_path, dataset="odd", with_masks=False, crop="none")
    vol = read_volume(paths.volume("p1"))
    assert vol.image.shape != hu.shape or not np.array_equal(vol.image, window(hu))  # it was reordered
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    _overlays(vol, reader.Execute())
