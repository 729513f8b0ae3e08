"""Backbone registry, e2e wrapper and checkpoints (networks/)."""
from __future__ import annotations

import pytest
import torch

from networks.checkpoint import FORMAT, load_model, save_checkpoint
from networks.e2e import E2ESegmenter, build_segmenter
from networks.registry import build_model, list_models, spatial_dims_of


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors on a shared machine: thread start-up and contention dominate
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Tiny configurations for the built-in names; a plug-in backbone (networks/plugins/) without
# an entry is tested with its defaults.
TINY = {
    "unet": dict(base_channels=4, depth=2),
    "unet3d": dict(base_channels=4, depth=2),
    "attention_unet": dict(channels=(4, 8, 16)),
    "unetpp": dict(features=(4, 4, 8, 8, 16, 4)),
    "monai:AttentionUnet": dict(channels=(4, 8), strides=(2,)),
    "monai:BasicUNet": dict(features=(4, 4, 8, 8, 16, 4)),
    "monai:BasicUNetPlusPlus": dict(features=(4, 4, 8, 8, 16, 4)),
    "monai:SegResNet": dict(init_filters=4, norm=("group", {"num_groups": 2})),
    # 2-D and depth-1 stages keep the transformer tiny; 40 -> padded to 64 (its divisor is 32)
    "monai:SwinUNETR": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), spatial_dims=2),
    "monai:UNet": dict(channels=(4, 8, 16), strides=(2, 2)),
}


def test_every_builtin_backbone_is_registered():
    assert set(TINY) <= set(list_models())
    assert "example_fcn" in list_models()  # networks/plugins/ is imported by the registry


@pytest.mark.parametrize("name", list_models())
def test_backbone_forward_backward(name):
    torch.manual_seed(0)
    kw = TINY.get(name, {})
    dims = spatial_dims_of(name, **kw)
    # odd sizes: the adapters pad to the network's divisor and crop back (instance norm needs a
    # bottleneck of more than one voxel, hence 18 on one axis)
    size = (40, 36) if "Swin" in name else ((19, 21) if dims == 2 else (18, 15, 11))
    model = build_model(name, 3, 1, **kw)
    x = torch.rand((2, 3) + size)
    y = model(x)
    assert y.shape == (2, 1) + size
    assert torch.isfinite(y).all()
    (y**2).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="unknown backbone 'vnet_typo'.*unet3d"):
        build_model("vnet_typo", 1, 1)
    with pytest.raises(ValueError, match="monai:NoSuchNet"):
        spatial_dims_of("monai:NoSuchNet")


def test_bad_kwargs_and_dims_raise_value_error():
    with pytest.raises(ValueError, match="unet"):
        build_model("unet", 1, 1, no_such_arg=3)
    with pytest.raises(ValueError, match="spatial_dims"):
        build_model("monai:BasicUNet", 1, 1, spatial_dims=4)
    with pytest.raises(ValueError, match="expects a 4-D tensor"):
        build_model("unet", 1, 1, base_channels=2, depth=1)(torch.rand(1, 1, 8, 8, 8))


def test_monai_spatial_dims_default_and_override():
    assert spatial_dims_of("monai:BasicUNet") == 3
    assert spatial_dims_of("monai:BasicUNet", spatial_dims=2) == 2
    m = build_model("monai:BasicUNet", 2, 1, spatial_dims=2, features=(2, 2, 2, 2, 2, 2))
    assert m(torch.rand(1, 2, 32, 16)).shape == (1, 1, 32, 16)


@pytest.mark.parametrize("name,shape,gated_channels", [
    ("unet", (2, 1, 24, 20), 1),
    ("unet3d", (1, 1, 16, 12, 10), 3),
])
def test_e2e_wrapper_gates_and_trains_the_head(name, shape, gated_channels):
    torch.manual_seed(0)
    model = build_segmenter(name, "e2e", model_kwargs=TINY[name])
    assert isinstance(model, E2ESegmenter)
    x = torch.rand(shape)
    gated, s = model.gated(x)
    assert s.shape == (shape[0], gated_channels) + shape[2:]
    # the residual gate G + G * S_i, one channel per plane
    torch.testing.assert_close(gated, x + x * s)
    y = model(x)
    assert y.shape == (shape[0], 1) + shape[2:]
    y.mean().backward()
    assert all(p.grad is not None for p in model.salience.head.parameters())
    # the filter bank is a fixed buffer, not a parameter
    assert not any("bank" in n for n, _ in model.named_parameters())
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    assert first_conv.in_channels == gated_channels
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand((shape[0], 3) + shape[2:]))


@pytest.mark.parametrize("name,salience,shape", [
    ("unet", "offline", (1, 3, 20, 20)),
    ("unet3d", "e2e", (1, 1, 12, 12, 8)),
    ("monai:UNet", "none", (1, 1, 12, 12, 8)),
])
def test_checkpoint_rebuilds_model_without_flags(tmp_path, name, salience, shape):
    torch.manual_seed(0)
    kw = TINY[name]
    model = build_segmenter(name, salience, model_kwargs=kw)
    # move BN statistics away from their defaults, so a rebuilt model would differ
    model.train()
    model(torch.rand(shape) * 3)
    model.eval()
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, model_name=name, model_kwargs=kw, salience=salience, config={"x": 1}, epoch=3,
                    iteration=30, best_metric=0.5, img_size=[20, 20], patch_size=[12, 12, 8])
    rebuilt, ckpt = load_model(path)
    assert ckpt["format"] == FORMAT and ckpt["in_channels"] == shape[1] and ckpt["out_channels"] == 1
    assert ckpt["spatial_dims"] == len(shape) - 2
    assert (ckpt["img_size"] is None) == (len(shape) == 5) and (ckpt["patch_size"] is None) == (len(shape) == 4)
    assert not rebuilt.training
    x = torch.rand(shape)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_load_model_rejects_non_checkpoints(tmp_path):
    model = build_model("unet", 1, 1, base_channels=2, depth=1)
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    with pytest.raises(ValueError, match="plain.pth: not a livervessel-ckpt-v1 checkpoint"):
        load_model(plain)
    junk = tmp_path / "junk.pth"
    junk.write_text("not torch")
    with pytest.raises(ValueError, match="junk.pth: not a readable torch file"):
        load_model(junk)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_model(tmp_path / "missing.pth")


def test_load_model_reports_mismatched_weights(tmp_path):
    model = build_segmenter("unet", "none", model_kwargs={"base_channels": 2, "depth": 1})
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, model_name="unet", model_kwargs={"base_channels": 2, "depth": 1}, salience="none",
                    config={}, epoch=0, iteration=0, best_metric=-1)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_kwargs"] = {"base_channels": 4, "depth": 1}
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"m.pth: weights do not fit model unet.*shape mismatches"):
        load_model(path)
