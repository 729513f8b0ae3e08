"""Volume inference (inference.py): exact answers with known predictors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inference import predict_volume, sliding_window_volume


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
    ref = F.interpolate(torch.sigmoid(2 * up), size=(12, 10), mode="bilinear", align_corners=False)
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
