"""utils.orientation: the models see every scan in the training data's (LPS) order."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from utils.orientation import lps_view

# direction matrices (row-major, columns = ITK axes x, y, z in LPS patient coordinates)
DIRECTIONS = {
    "LPS (3D-IRCADb)": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "rows reversed": (1, 0, 0, 0, -1, 0, 0, 0, 1),
    "columns reversed": (-1, 0, 0, 0, 1, 0, 0, 0, 1),
    "feet first, turned": (-1, 0, 0, 0, -1, 0, 0, 0, -1),
    "coronal slices": (1, 0, 0, 0, 0, -1, 0, 1, 0),
    "sagittal slices, slightly oblique": (0, 0.1, 0.995, 0.995, 0, 0, -0.1, -0.995, 0.0),
    "tilted 45 degrees": (1, 0, 0, 0, 0.5 ** 0.5, -(0.5 ** 0.5), 0, 0.5 ** 0.5, 0.5 ** 0.5),
}


def itk_lps(arr: np.ndarray, direction, spacing_xyz) -> tuple[np.ndarray, tuple]:
    """The reference: SimpleITK's DICOMOrient to LPS, as the NIfTI reader does."""
    img = sitk.GetImageFromArray(np.transpose(arr, (2, 0, 1)))
    img.SetDirection([float(v) for v in direction])
    img.SetSpacing(spacing_xyz)
    out = sitk.DICOMOrient(img, "LPS")
    sx, sy, sz = out.GetSpacing()
    return np.transpose(sitk.GetArrayFromImage(out), (1, 2, 0)), (sy, sx, sz)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_lps_view_equals_simpleitk_dicomorient_and_round_trips(name):
    d = DIRECTIONS[name]
    if name.startswith("sagittal"):  # orthonormalise the slightly oblique matrix for ITK
        u, _, vt = np.linalg.svd(np.asarray(d, float).reshape(3, 3))
        d = tuple((u @ vt).ravel())
    arr = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)  # (H, W, D): three sizes
    spacing_rcs = (0.7, 0.6, 2.0)
    want, want_spacing = itk_lps(arr, d, (spacing_rcs[1], spacing_rcs[0], spacing_rcs[2]))
    view = lps_view(d)
    assert np.array_equal(view.forward(arr), want)
    assert view.spacing(spacing_rcs) == pytest.approx(want_spacing)
    assert np.array_equal(view.back(view.forward(arr)), arr)
    # leading axes (K, H, W, D) move with the array
    two = np.stack([arr, -arr])
    assert np.array_equal(view.forward(two)[1], -want) and np.array_equal(view.back(view.forward(two)), two)
    assert view.identity == (name in ("LPS (3D-IRCADb)", "tilted 45 degrees"))  # ITK: "LPS" too


@pytest.mark.parametrize("name", list(DIRECTIONS)[:5])
def test_a_box_of_the_reoriented_array_is_the_same_voxels_stored(name):
    view = lps_view(DIRECTIONS[name])
    shape = (4, 5, 6)
    marked = np.zeros(shape, bool)
    marked[1:3, 2:5, 0:4] = True
    fwd = view.forward(marked)
    idx = np.argwhere(fwd)
    box = (idx[:, 0].min(), idx[:, 0].max() + 1, idx[:, 1].min(), idx[:, 1].max() + 1, idx[:, 2].min(),
           idx[:, 2].max() + 1)
    assert view.box_back(box, fwd.shape) == (1, 3, 2, 5, 0, 4)


def test_degenerate_directions_are_refused():
    with pytest.raises(ValueError, match="without a direction"):
        lps_view((1, 0, 0, 0, 0, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="9 finite numbers"):
        lps_view((1, 0, 0))


@pytest.mark.parametrize("name", [n for n in DIRECTIONS if not n.startswith(("sagittal", "tilted"))])
def test_the_reoriented_arrays_geometry_puts_each_voxel_where_it_was(name):
    # preprocess.py stores a series reordered to LPS with this geometry; written by to_sitk, the
    # reordered array lies on the stored one voxel for voxel, as SimpleITK's DICOMOrient places it
    from evaluation.predictions import to_sitk

    d = DIRECTIONS[name]
    arr = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    spacing_rcs = (0.7, 0.6, 2.0)
    stored = sitk.GetImageFromArray(np.transpose(arr, (2, 0, 1)))
    stored.SetDirection([float(v) for v in d])
    stored.SetSpacing((spacing_rcs[1], spacing_rcs[0], spacing_rcs[2]))
    stored.SetOrigin((-20.0, 14.0, 3.5))
    view = lps_view(d)
    origin, direction = view.geometry(stored.GetOrigin(), d, spacing_rcs, arr.shape)
    ref = sitk.DICOMOrient(stored, "LPS")
    assert origin == pytest.approx(ref.GetOrigin()) and direction == pytest.approx(ref.GetDirection())
    written = to_sitk(view.forward(arr), view.spacing(spacing_rcs), None, origin, direction)
    back = sitk.Resample(stored, written, sitk.Transform(), sitk.sitkNearestNeighbor, np.nan)
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(back), (1, 2, 0)), view.forward(arr))
