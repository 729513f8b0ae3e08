"""Volume inference (inference.core and inference.predictor): exact answers with known predictors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataloaders.transforms import resize_2d, resize_planes
from inference import (THRESHOLD, binarize, model_grid, predict_volume, remove_small_components,
                       sliding_window_volume, vessel_mask)


class Scale(torch.nn.Module):
    """Logits = k * (mean over input channels); has one parameter so device checks run."""

    def __init__(self, k: float = 2.0) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(float(k)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * x.mean(dim=1, keepdim=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


@pytest.mark.parametrize("shape, patch", [((13, 11, 9), (8, 6, 4)), ((5, 7, 3), (8, 8, 8)), ((16, 16, 8), (8, 8, 4))])
def test_sliding_window_two_x_is_exact(shape, patch):
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 2) + shape).astype(np.float32))
    y = sliding_window_volume(lambda t: 2 * t, x, patch, overlap=0.5, batch_size=3)
    assert y.shape == x.shape
    np.testing.assert_allclose(y.numpy(), 2 * x.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, patch", [((13, 11, 9), (8, 6, 4)), ((5, 7, 3), (8, 8, 8))])
@pytest.mark.parametrize("tta", [False, True])
def test_predict_volume_3d_matches_pointwise_model(shape, patch, tta):
    image = np.random.default_rng(1).uniform(size=shape).astype(np.float32)
    p = predict_volume(Scale(2.0), image, None, salience_mode="none", spatial_dims=3, patch_size=patch,
                       overlap=0.5, tta=tta, batch_size=2)
    assert p.dtype == np.float32 and p.shape == shape
    np.testing.assert_allclose(p, _sigmoid(2 * image), rtol=1e-5, atol=1e-6)


def test_predict_volume_offline_gates_with_salience():
    rng = np.random.default_rng(2)
    image = rng.uniform(size=(9, 10, 5)).astype(np.float32)
    sal = rng.uniform(size=(3, 9, 10, 5)).astype(np.float32)
    p = predict_volume(Scale(1.0), image, sal, salience_mode="offline", spatial_dims=2, batch_size=2)
    gated_mean = (image[None] * (1 + sal)).mean(axis=0)
    np.testing.assert_allclose(p, _sigmoid(gated_mean), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tta", [False, True])
def test_predict_volume_2d_native(tta):
    image = np.random.default_rng(3).uniform(size=(12, 10, 7)).astype(np.float32)
    p = predict_volume(Scale(2.0), image, None, salience_mode="none", spatial_dims=2, batch_size=3, tta=tta)
    np.testing.assert_allclose(p, _sigmoid(2 * image), rtol=1e-5, atol=1e-6)


def test_predict_volume_2d_resized_equals_reference_resample():
    image = np.random.default_rng(4).uniform(size=(12, 10, 5)).astype(np.float32)
    p = predict_volume(Scale(2.0), image, None, salience_mode="none", spatial_dims=2, img_size=(16, 20),
                       batch_size=2)
    # reference: resize every slice up, apply the model, resize back, all in one batch
    x = torch.from_numpy(np.moveaxis(image, 2, 0)[:, None])
    up = F.interpolate(x, size=(16, 20), mode="bilinear", align_corners=False)
    # back to the stored grid with the same geometry, antialiased because it shrinks
    ref = F.interpolate(torch.sigmoid(2 * up), size=(12, 10), mode="bilinear", align_corners=False, antialias=True)
    np.testing.assert_allclose(p, np.moveaxis(ref[:, 0].numpy(), 0, 2), rtol=1e-5, atol=1e-6)
    assert p.shape == image.shape


def test_tta_averages_flipped_predictions():
    """A position-dependent model: TTA must equal the mean over the four un-flipped outputs."""
    ramp = torch.linspace(-1, 1, 10)

    class Ramp(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + ramp.view(1, 1, 1, -1)

    image = np.random.default_rng(5).uniform(size=(6, 10, 3)).astype(np.float32)
    p = predict_volume(Ramp(), image, None, salience_mode="none", spatial_dims=2, tta=True)
    # flips along W turn the ramp around; flips along H leave it: two with +ramp, two with -ramp
    ref = 0.5 * (_sigmoid(image + ramp.numpy()[None, :, None]) + _sigmoid(image - ramp.numpy()[None, :, None]))
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)


def test_model_mode_restored_and_bad_input():
    m = Scale()
    m.train()
    image = np.zeros((4, 4, 2), np.float32)
    predict_volume(m, image, None, salience_mode="none", spatial_dims=2)
    assert m.training
    with pytest.raises(ValueError, match="salience"):
        predict_volume(m, image, None, salience_mode="offline", spatial_dims=2)
    with pytest.raises(ValueError, match="patch_size"):
        predict_volume(m, image, None, salience_mode="none", spatial_dims=3)
    with pytest.raises(ValueError, match=r"\(H, W, D\)"):
        predict_volume(m, image[..., 0], None, salience_mode="none", spatial_dims=2)


def _blobs() -> np.ndarray:
    """A 4 x 4 x 4 cube (64 voxels), a 2 x 2 x 2 cube (8) and a single voxel touching the big
    cube only at a corner (26-connected to it), in a 20^3 grid."""
    m = np.zeros((20, 20, 20), dtype=np.uint8)
    m[2:6, 2:6, 2:6] = 1
    m[10:12, 10:12, 10:12] = 1
    m[6, 6, 6] = 1  # corner neighbour of m[5, 5, 5]
    m[16, 3, 17] = 1  # alone
    return m


@pytest.mark.parametrize("spacing, min_mm3, kept", [
    ((1.0, 1.0, 1.0), 0.0, {65, 8, 1}),
    ((1.0, 1.0, 1.0), 1.0, {65, 8, 1}),   # a 1 mm^3 voxel is not smaller than 1 mm^3
    ((1.0, 1.0, 1.0), 1.5, {65, 8}),
    ((1.0, 1.0, 1.0), 9.0, {65}),
    ((0.5, 0.5, 2.0), 4.0, {65, 8}),       # voxels of 0.5 mm^3: 8 of them are 4 mm^3
    ((0.5, 0.5, 2.0), 4.01, {65}),
    ((1.0, 1.0, 1.0), 100.0, set()),
])
def test_remove_small_components_by_volume(spacing, min_mm3, kept):
    from scipy import ndimage

    out = remove_small_components(_blobs(), spacing, min_mm3)
    assert out.dtype == np.uint8
    lab, n = ndimage.label(out, structure=np.ones((3, 3, 3)))
    assert set(np.bincount(lab.ravel())[1:].tolist()) == kept
    assert not (out & ~_blobs().astype(bool)).any()  # only removes


def test_remove_small_components_checks_input():
    with pytest.raises(ValueError, match="H, W, D"):
        remove_small_components(np.ones((4, 4)), (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="spacing"):
        remove_small_components(np.ones((4, 4, 4)), (1, 1), 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        remove_small_components(np.ones((4, 4, 4)), (1, 1, 1), -1.0)


def test_vessel_mask_thresholds_then_drops_small_components():
    prob = _blobs().astype(np.float32) * 0.7
    prob[10:12, 10:12, 10:12] = 0.4  # the 8-voxel cube is under the threshold
    np.testing.assert_array_equal(vessel_mask(prob, (1, 1, 1)), binarize(prob))
    np.testing.assert_array_equal(vessel_mask(prob, (1, 1, 1), threshold=0.3), _blobs())
    expect = _blobs()
    expect[16, 3, 17] = 0
    np.testing.assert_array_equal(vessel_mask(prob, (1, 1, 1), threshold=0.3, min_component_mm3=2.0), expect)


def test_binarize_is_the_one_rule():
    prob = np.array([0.0, np.nextafter(np.float32(THRESHOLD), np.float32(0)), THRESHOLD, 0.7, 1.0], np.float32)
    np.testing.assert_array_equal(binarize(prob), [0, 0, 1, 1, 1])
    assert binarize(prob).dtype == np.uint8
    np.testing.assert_array_equal(binarize(torch.from_numpy(prob).double()), [0, 0, 1, 1, 1])


def _centroid(a: np.ndarray, scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Mass centroid (row, col) in the coordinates of a grid ``scale`` times coarser (pixel centres)."""
    r, c = np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), indexing="ij")
    m = a.sum()
    return np.array([((r + 0.5) * scale[0] - 0.5)[a > 0] @ a[a > 0] / m,
                     ((c + 0.5) * scale[1] - 0.5)[a > 0] @ a[a > 0] / m])


@pytest.mark.parametrize("small", [256, 200])
def test_label_keeps_thin_line_and_disc_centroids(small):
    """Image and label share one geometry: a one-pixel line and a small disc keep their
    centroids (within 0.25 px of the image's and of the truth) down to ``small`` and back to
    512, and the label keeps the line's mass instead of dropping it."""
    n = 512
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    shapes = {"line": (c == 201) & (r >= 100) & (r < 400), "disc": (r - 300.0) ** 2 + (c - 120.0) ** 2 <= 3.0**2}
    for name, mask in shapes.items():
        true = _centroid(mask.astype(np.float64))
        image = 0.2 + 0.6 * mask.astype(np.float32)
        x, lab = resize_2d(image[None], mask.astype(np.uint8), (small, small))
        s = n / small
        # the vessel's contrast over background, and the soft label, both at the small size
        img_c, lab_c = _centroid(x[0] - 0.2, (s, s)), _centroid(lab, (s, s))
        assert np.abs(lab_c - img_c).max() < 0.25 and np.abs(lab_c - true).max() < 0.25, name
        assert lab.sum() * s * s == pytest.approx(mask.sum(), rel=0.02), name  # mass kept, not dropped
        # and back to the stored grid, as a prediction is mapped back
        back = resize_planes(torch.from_numpy(np.stack([x[0] - 0.2, lab]))[None], (n, n))[0].numpy()
        assert np.abs(_centroid(back[1]) - _centroid(back[0])).max() < 0.25, name
        assert np.abs(_centroid(back[1]) - true).max() < 0.25, name


def test_target_spacing_runs_whole_planes_padded_like_a_reference():
    """A pointwise model: the result is exactly resample -> sigmoid -> resample back, whether the
    resampled plane is larger than img_size (run whole) or smaller along a side (zero-padded
    centred to img_size there); the model sees one plane of max(grid, img_size) per side."""
    rng = np.random.default_rng(7)
    image = rng.uniform(size=(40, 30, 3)).astype(np.float32)
    seen = []

    class Spy(Scale):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    for spacing, tile, grid, seen_size in (((0.5, 0.5, 2.0), (8, 8), (20, 15), (20, 15)),
                                           ((0.5, 0.6, 2.0), (32, 32), (20, 18), (32, 32)),
                                           ((0.5, 0.5, 2.0), (12, 24), (20, 15), (20, 24))):
        seen.clear()
        assert model_grid(image.shape[:2], tile, 1.0, spacing) == grid
        p = predict_volume(Spy(2.0), image, None, salience_mode="none", spatial_dims=2, img_size=tile,
                           target_spacing=1.0, spacing=spacing, batch_size=2)
        x = resize_planes(torch.from_numpy(np.moveaxis(image, 2, 0)[:, None]), grid)
        ref = resize_planes(torch.sigmoid(2 * x), image.shape[:2])[:, 0].numpy()
        np.testing.assert_allclose(p, np.moveaxis(ref, 0, 2), rtol=1e-5, atol=1e-6)
        assert set(seen) == {seen_size}
    with pytest.raises(ValueError, match="spacing"):
        predict_volume(Scale(), image, None, salience_mode="none", spatial_dims=2, img_size=(8, 8), target_spacing=1.0)


def test_target_spacing_offline_gates_after_resampling():
    rng = np.random.default_rng(8)
    image = rng.uniform(size=(10, 12, 2)).astype(np.float32)
    sal = rng.uniform(size=(3, 10, 12, 2)).astype(np.float32)
    p = predict_volume(Scale(1.0), image, sal, salience_mode="offline", spatial_dims=2, target_spacing=0.5,
                       spacing=(1.0, 1.0, 1.0))
    planes = resize_planes(torch.from_numpy(np.concatenate([image[None], sal]).transpose(3, 0, 1, 2).copy()), (20, 24))
    gated = (planes[:, :1] * (1 + planes[:, 1:])).mean(1, keepdim=True)
    ref = resize_planes(torch.sigmoid(gated), (10, 12))[:, 0].numpy()
    np.testing.assert_allclose(p, np.moveaxis(ref, 0, 2), rtol=1e-5, atol=1e-6)


def test_predictor_is_one_path_for_validation_test_and_predict(tiny_dataset, tmp_path):
    """The model being trained (validation) and its checkpoint (test.py, predict.py) give the same
    probabilities and masks through :class:`inference.predictor.Predictor`."""
    from networks.checkpoint import save_checkpoint
    from networks.e2e import build_segmenter
    from inference.predictor import Predictor
    from train_config import TrainConfig
    from utils.h5io import read_salience, read_volume

    kw = {"base_channels": 4, "depth": 2}
    torch.manual_seed(0)
    model = build_segmenter("unet", "offline", 1, kw).eval()
    cfg = TrainConfig(dataset="tiny", model_kwargs=kw, img_size=(24, 24), min_component_mm3=2.0)
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, model_name="unet", model_kwargs=kw, salience="offline", config=cfg.to_json(),
                    epoch=1, iteration=1, best_metric=0.0, img_size=cfg.img_size, min_component_mm3=2.0)
    vol = read_volume(tiny_dataset.paths.volume("case0004"))
    sal = read_salience(tiny_dataset.paths.salience("case0004"))
    live = Predictor.for_training(model, cfg, 2, "cpu")
    stored = Predictor.from_checkpoint(path, "cpu", with_generator=False)
    assert stored.img_size == [24, 24] and stored.min_component_mm3 == 2.0 and stored.threshold == THRESHOLD
    a = live.probabilities(vol.image, vol.spacing, sal)
    b = stored.probabilities(vol.image, vol.spacing, sal)
    np.testing.assert_array_equal(a, b)
    direct = predict_volume(model, vol.image, sal, salience_mode="offline", spatial_dims=2, img_size=[24, 24])
    np.testing.assert_array_equal(a, direct)
    roi = vol.liver.astype(bool)
    np.testing.assert_array_equal(stored.mask(b, vol.spacing, roi),
                                  remove_small_components(binarize(np.where(roi, b, 0.0)), vol.spacing, 2.0))
    # an offline model file without a generator cannot make its own maps
    with pytest.raises(ValueError, match="no salience generator"):
        stored.probabilities(vol.image, vol.spacing)
