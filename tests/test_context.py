"""2.5-D input (``main.py --context_slices K``): the K slices above and below as input channels,
in training items, in inference and in the checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dataloaders.datasets import SliceDataSet
from dataloaders.inputs import context_indices, input_channels, model_input
from inference.core import predict_volume
from inference.predictor import Predictor
from networks.checkpoint import load_checkpoint
from scripts.draw_method_figure import draw_method_figure
from trainer import TrainConfig, train
from utils.h5io import DatasetPaths, Volume, slice_name, write_list, write_salience, write_slice, write_volume

H, W, D = 16, 16, 5
LEVELS = 0.1 + 0.1 * np.arange(D)  # slice z of the test volume is a ramp plus LEVELS[z]


pytestmark = pytest.mark.usefixtures("one_thread")


def ramp_volume() -> np.ndarray:
    """(H, W, D) float32: an in-plane ramp that no quarter turn or flip leaves unchanged, plus a
    level per slice."""
    r, c = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    plane = 0.05 * r / H + 0.03 * c / W
    return (plane[:, :, None] + LEVELS[None, None, :]).astype(np.float32)


def ramp_dataset(root: Path, salience: bool = False) -> DatasetPaths:
    paths = DatasetPaths.of(root / "data", "ramp", root / "list")
    image = ramp_volume()
    label = np.zeros(image.shape, np.uint8)
    label[4:8, 4:8] = 1
    write_volume(paths.volume("case0001"), Volume(image=image, label=label, liver=np.ones_like(label),
                                                  spacing=(0.8, 0.8, 2.0), crop=(0, H, 0, W, 0, D), source="ramp"))
    sal = np.stack([image * 0 + 0.5, image * 0 + 0.25, image * 0]) if salience else None
    if salience:
        write_salience(paths.salience("case0001"), sal, generator="test-standin")
    names = []
    for z in range(D):
        names.append(slice_name("case0001", z))
        write_slice(paths.slice(names[-1]), image[:, :, z], label[:, :, z], None if sal is None else sal[:, :, :, z])
    write_list(paths.list_file("slice_train"), names)
    for split in ("train", "val", "test"):
        write_list(paths.list_file(f"vol_{split}"), ["case0001"])
    return paths


def test_context_indices_are_the_neighbours_clamped_to_the_volume():
    assert context_indices(2, 5, 2) == [0, 1, 3, 4]
    assert context_indices(0, 5, 2) == [0, 0, 1, 2]
    assert context_indices(4, 5, 1) == [3, 4]
    assert context_indices(0, 1, 1) == [0, 0]
    with pytest.raises(ValueError, match="outside"):
        context_indices(5, 5, 1)


def test_input_channels_count_the_neighbours_and_e2e_takes_none():
    assert input_channels("none", 1) == 3 and input_channels("offline", 2) == 7 and input_channels("none") == 1
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="--context_slices must be an integer"):
            input_channels("none", bad)
    with pytest.raises(ValueError, match="e2e"):
        input_channels("e2e", 1)
    with pytest.raises(ValueError, match="e2e"):
        TrainConfig(dataset="x", salience="e2e", context_slices=1)
    with pytest.raises(ValueError, match=r"neighbours must be \(2K"):
        model_input(np.zeros((4, 4)), None, "none", np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="e2e"):
        model_input(np.zeros((4, 4)), None, "e2e", np.zeros((2, 4, 4)))


@pytest.mark.parametrize("cache", [False, True])
def test_slice_items_hold_the_neighbouring_slices_after_the_modes_channels(tmp_path, cache):
    image = ramp_volume()
    plain = SliceDataSet(ramp_dataset(tmp_path), "none", img_size=(H, W), augment=False, context=2, cache=cache)
    for z in range(D):
        x = plain[z]["input"].numpy()
        want = [image[:, :, z]] + [image[:, :, j] for j in context_indices(z, D, 2)]
        assert x.shape == (5, H, W)
        np.testing.assert_allclose(x, np.stack(want), atol=1e-3 if cache else 1e-6)
    paths = ramp_dataset(tmp_path / "sal", salience=True)
    x = SliceDataSet(paths, "offline", img_size=(H, W), augment=False, context=1)[3]["input"].numpy()
    g = image[:, :, 3]
    np.testing.assert_allclose(x, np.stack([1.5 * g, 1.25 * g, g, image[:, :, 2], image[:, :, 4]]), atol=1e-6)


def test_a_slice_beyond_its_volume_names_both_files(tmp_path):
    paths = ramp_dataset(tmp_path)
    write_slice(paths.slice(slice_name("case0001", D)), ramp_volume()[:, :, 0], np.zeros((H, W), np.uint8), None)
    write_list(paths.list_file("slice_train"), [slice_name("case0001", D)])
    with pytest.raises(ValueError, match=rf"slice {D}, but .*case0001.h5 has {D} slices"):
        SliceDataSet(paths, "none", img_size=(H, W), augment=False, context=1)[0]


def test_neighbours_turn_flip_and_change_intensity_with_the_slice(tmp_path):
    paths = ramp_dataset(tmp_path)
    image = ramp_volume()
    aug = SliceDataSet(paths, "none", img_size=(H, W), augment=True, jitter=True, blur_aug=2.0, context=1)
    turned = 0
    for epoch in range(6):
        for z in range(D):
            x = aug[(epoch, z)]["input"].numpy()
            # the same turn, flip, blur and affine jitter on every plane: plane differences stay flat,
            # the levels' difference times the jitter's one scale in [0.9, 1.1]
            scales = []
            for k, j in enumerate(context_indices(z, D, 1), start=1):
                diff = x[k] - x[0]
                assert np.ptp(diff) < 1e-5
                if j == z:
                    assert abs(diff.mean()) < 1e-5
                else:
                    scales.append(diff.mean() / (LEVELS[j] - LEVELS[z]))
            assert all(0.9 - 1e-4 <= s <= 1.1 + 1e-4 for s in scales) and np.ptp(scales) < 1e-4
            turned += np.corrcoef(x[0].ravel(), image[:, :, z].ravel())[0, 1] < 0.95
    assert turned > 0
    # the blur is in-plane: a plane's level does not leak into its neighbours
    blur = SliceDataSet(paths, "none", img_size=(H, W), augment=False, blur_aug=2.0, context=1)
    for epoch in range(4):
        x = blur[(epoch, 2)]["input"].numpy()
        np.testing.assert_allclose(x[1] - x[0], LEVELS[1] - LEVELS[2], atol=1e-5)
        np.testing.assert_allclose(x[2] - x[0], LEVELS[3] - LEVELS[2], atol=1e-5)


@pytest.mark.parametrize("target_spacing", [None, 0.5])
def test_predict_volume_gives_each_slice_its_neighbours(target_spacing):
    image = np.broadcast_to(LEVELS, (H, W, D)).astype(np.float32).copy()

    def below_minus_here(x: torch.Tensor) -> torch.Tensor:  # logits from channels (here, z-1, z+1)
        assert x.shape[1] == 3
        return x[:, 1:2] - x[:, 0:1] + 2 * (x[:, 2:3] - x[:, 0:1])

    prob = predict_volume(below_minus_here, image, None, salience_mode="none", spatial_dims=2, context=1,
                          target_spacing=target_spacing, spacing=(0.8, 0.8, 2.0),
                          img_size=(32, 32) if target_spacing else None, batch_size=2)
    for z in range(D):
        below, above = context_indices(z, D, 1)
        want = 1 / (1 + np.exp(-(LEVELS[below] - LEVELS[z] + 2 * (LEVELS[above] - LEVELS[z]))))
        np.testing.assert_allclose(prob[:, :, z], want, atol=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        predict_volume(below_minus_here, image, None, salience_mode="none", spatial_dims=3, context=1,
                       patch_size=(8, 8, 4))


def test_a_context_run_trains_and_its_checkpoint_rebuilds_the_model(tmp_path):
    paths = ramp_dataset(tmp_path, salience=True)
    kw = dict(dataset="ramp", root_path=str(tmp_path / "data"), list_dir=str(tmp_path / "list"),
              output_root=str(tmp_path / "ckpt"), model_kwargs={"base_channels": 4, "depth": 2}, img_size=(16, 16),
              batch_size=2, num_workers=0, max_epochs=1, max_iterations=2, salience="none")
    result = train(TrainConfig(context_slices=1, **kw))
    best = result.run_dir / "best_model.pth"
    ckpt = load_checkpoint(best)
    assert ckpt["in_channels"] == 3 and ckpt["config"]["context_slices"] == 1
    pred = Predictor.from_checkpoint(best, device="cpu")
    assert pred.context_slices == 1
    first = next(m for m in pred.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 3
    assert pred.probabilities(ramp_volume(), (0.8, 0.8, 2.0)).shape == (H, W, D)
    # the method figure runs the model as inference does
    fig = draw_method_figure(best, tmp_path / "fig.png", "ramp", str(tmp_path / "data"), str(tmp_path / "list"))
    assert fig.stat().st_size > 0 and paths.volume("case0001").is_file()
    with pytest.raises(ValueError, match="saw 1 neighbouring slices on each side, this run --context_slices 0"):
        train(TrainConfig(init_from=str(best), **{**kw, "exp": "one_slice"}))
    with pytest.raises(ValueError, match="2-D backbones"):
        train(TrainConfig(context_slices=1, **{**kw, "backbone": "unet3d", "model_kwargs": {"base_channels": 2},
                                                "exp": "three_d", "patch_size": (8, 8, 4)}))
