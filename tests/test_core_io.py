"""Round trips of the shared I/O layer: HDF5 layout, atomic writes, DICOM writer."""
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from phantom.dicom_io import write_patient
from utils.atomic import atomic_path
from utils.h5io import read_list, read_salience, read_volume


def test_tiny_dataset_round_trip(tiny_dataset):
    p = tiny_dataset.paths
    case = tiny_dataset.splits["train"][0]
    vol = read_volume(p.volume(case))
    assert vol.image.dtype == np.float32 and vol.image.shape == (32, 32, 12)
    assert vol.spacing == (0.8, 0.8, 1.6) and vol.crop == (0, 32, 0, 32, 0, 12)
    assert read_salience(p.salience(case)).shape == (3, 32, 32, 12)
    assert len(read_list(p.list_file("slice_train"))) == 3 * 12


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError):
        final.write_text("x")
        with atomic_path(final, overwrite=False):
            pass


def test_read_volume_names_the_file_on_bad_input(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="bad.h5"):
        read_volume(bad)


@pytest.mark.parametrize("unsigned", [False, True])
def test_dicom_writer_round_trip(tmp_path, unsigned):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 1500, (20, 24, 5)).astype(np.int16)
    mask = (hu > 100).astype(np.uint8)
    write_patient(tmp_path / "p", hu, {"liver": mask}, (0.7, 0.8, 1.6), unsigned_intercept=unsigned)
    ds = pydicom.dcmread(tmp_path / "p" / "PATIENT_DICOM" / "image_3")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    back = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(back, hu[:, :, 3])
    assert (ds.pixel_array.dtype == np.uint16) == unsigned
    m = pydicom.dcmread(tmp_path / "p" / "MASKS_DICOM" / "liver" / "image_3").pixel_array
    np.testing.assert_array_equal(m, mask[:, :, 3] * 255)
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(tmp_path / "p" / "PATIENT_DICOM")))
    img = r.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(1, 2, 0), hu)
    assert img.GetSpacing() == pytest.approx((0.8, 0.7, 1.6))
