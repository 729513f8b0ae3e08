"""Backbone registry, e2e wrapper and checkpoints (networks/)."""
from __future__ import annotations

from fractions import Fraction
import sys

import pytest
import torch

import io

import networks.registry as registry
from networks.checkpoint import FORMAT, LEGACY_FORMAT_V1, code_version, load_model, save_checkpoint
from networks.e2e import E2ESegmenter, build_segmenter
from networks.registry import TESTED_MONAI, build_model, list_models, resolve_kwargs, spatial_dims_of
from networks.unet import BilinearUNet, UNet, UNet3D, load_seed_weights
from inference import inference_model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run fastest on one thread


# Tiny configurations for the built-in names; a plug-in backbone (networks/plugins/) without
# an entry is tested with its defaults.
TINY = {
    "unet": dict(base_channels=4, depth=2),
    "unet3d": dict(base_channels=4, depth=2),
    "unet_bilinear": dict(base_channels=4, depth=2),
    "unet3d_bilinear": dict(base_channels=4, depth=2),
    "unext": dict(channels=(4, 4, 8), embed_dims=(8, 16)),
    "transunet": dict(img_size=32, base_channels=4, block_units=(1, 1, 1), hidden_size=16, num_layers=1,
                      num_heads=2, mlp_dim=32, head_channels=16, decoder_channels=(8, 8, 4, 4)),
    "ynet": dict(base_channels=2),
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


@pytest.mark.parametrize("name,salience", [(n, "none") for n in list_models()] + [("unet", "e2e"), ("unet3d", "e2e")])
def test_inference_model_computes_what_eval_computes(name, salience):
    """inference.inference_model folds conv-BatchNorm pairs and turns 2-D models channels-last;
    its output must equal the eval-mode model's, and the model itself must not change."""
    torch.manual_seed(1)
    kw = TINY.get(name, {})
    dims = spatial_dims_of(name, **kw)
    size = (40, 36) if "Swin" in name else ((19, 21) if dims == 2 else (18, 15, 11))
    cin = 1 if salience == "e2e" else 3
    model = build_segmenter(name, salience, model_kwargs=kw) if salience == "e2e" else build_model(name, cin, 1, **kw)
    x = torch.rand((2, cin) + size)
    with torch.no_grad():
        for _ in range(2):  # BatchNorm running statistics away from (0, 1)
            model(x + torch.rand_like(x))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model.eval()(x)
        fast = inference_model(model, dims)
        y = fast(x.contiguous(memory_format=torch.channels_last) if dims == 2 else x)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="eval"):
        inference_model(model.train(), dims)
    if name == "unet":  # the seed U-Net's double convolutions are all folded
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


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
    ("unext", (2, 1, 24, 20), 1),
    ("transunet", (2, 1, 24, 20), 1),
    ("ynet", (2, 1, 24, 20), 1),
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
    ("transunet", "offline", (1, 3, 20, 20)),
    ("unext", "e2e", (1, 1, 40, 36)),  # bottleneck of more than one value for BatchNorm
    ("ynet", "none", (1, 1, 40, 36)),
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
    with pytest.raises(ValueError, match=f"plain.pth: not a {FORMAT} checkpoint"):
        load_model(plain)
    junk = tmp_path / "junk.pth"
    junk.write_text("not torch")
    with pytest.raises(ValueError, match=r"junk.pth: not a torch file \(neither the zip archive"):
        load_model(junk)
    # a zip archive that torch cannot read, and a torch file of pickled objects a safe load refuses
    import zipfile
    with zipfile.ZipFile(tmp_path / "other.pth", "w") as z:
        z.writestr("a.txt", "not torch")
    with pytest.raises(ValueError, match="other.pth: not a readable torch file"):
        load_model(tmp_path / "other.pth")
    # torch's pre-1.6 format (not a zip archive) still reads: a released seed file may be one
    from utils.torch_io import load_torch_file
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_torch_file(tmp_path / "legacy.pth", "weights file")["w"], torch.ones(2))
    for legacy in (False, True):  # either format: a torch file, of objects a safe load refuses
        torch.save({"format": FORMAT, "odd": Fraction(1, 3)}, tmp_path / "odd.pth",
                   _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError, match="odd.pth: a torch file holding objects a weights-only load refuses"):
            load_model(tmp_path / "odd.pth")
    # a zip-format file cut short (a download stopped half way)
    torch.save(model.state_dict(), tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut.pth: a damaged torch file \(a zip archive without its end"):
        load_model(tmp_path / "cut.pth")
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


# --------------------------------------------------------------------------- the seed's U-Nets


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_unet_is_the_seeds_unet_and_unet3d_the_releases():
    # milesial PyTorch-UNet, UNet(n_channels=3, n_classes=1, bilinear=False)
    assert _n_params(build_model("unet", 3, 1)) == 31_037_633
    # bilinear variant (this project's unet of format v1): 17.26M
    assert _n_params(build_model("unet_bilinear", 3, 1)) == 17_262_977
    # release UNet_3D(3, 1), feature_scale 4: UnetConv3(i, o) = two conv3d 3x3x3 with bias, no norm params;
    # up_concat(i, o) = UnetConv3(i + o, o); final 1x1x1
    f = [16, 32, 64, 128, 256]

    def conv3(i: int, o: int) -> int:
        return 27 * i * o + o + 27 * o * o + o

    expected = conv3(3, f[0]) + sum(conv3(f[k], f[k + 1]) for k in range(4))
    expected += sum(conv3(f[k + 1] + f[k], f[k]) for k in range(4)) + f[0] + 1
    assert _n_params(build_model("unet3d", 3, 1)) == expected
    # UNeXt at the paper's sizes: 1.47M parameters
    assert round(_n_params(build_model("unext", 3, 1)) / 1e6, 2) == 1.47


def _seed_2d_state_dict(cin: int, base: int, depth: int, gen: torch.Generator) -> dict:
    """Random state dict with the seed's (milesial) keys and shapes, written from its layout."""
    sd: dict[str, torch.Tensor] = {}

    def double_conv(prefix: str, i: int, o: int) -> None:
        for idx, (a, b) in ((0, (i, o)), (3, (o, o))):
            sd[f"{prefix}.{idx}.weight"] = torch.randn(b, a, 3, 3, generator=gen) * 0.3
            bn = f"{prefix}.{idx + 1}"
            sd[f"{bn}.weight"] = torch.rand(b, generator=gen) + 0.5
            sd[f"{bn}.bias"] = torch.randn(b, generator=gen) * 0.1
            sd[f"{bn}.running_mean"] = torch.randn(b, generator=gen) * 0.1
            sd[f"{bn}.running_var"] = torch.rand(b, generator=gen) + 0.5
            sd[f"{bn}.num_batches_tracked"] = torch.tensor(7)

    w = [base * 2**k for k in range(depth + 1)]
    double_conv("inc.double_conv", cin, w[0])
    for k in range(depth):
        double_conv(f"down{k + 1}.maxpool_conv.1.double_conv", w[k], w[k + 1])
    for k in range(depth):  # up1 is the deepest
        c = w[depth - k]
        sd[f"up{k + 1}.up.weight"] = torch.randn(c, c // 2, 2, 2, generator=gen) * 0.3
        sd[f"up{k + 1}.up.bias"] = torch.randn(c // 2, generator=gen) * 0.1
        double_conv(f"up{k + 1}.conv.double_conv", c, c // 2)
    sd["outc.conv.weight"] = torch.randn(1, w[0], 1, 1, generator=gen)
    sd["outc.conv.bias"] = torch.randn(1, generator=gen)
    return sd


def _write_double_conv(seq: torch.nn.Module, sd: dict, prefix: str) -> None:
    conv1, bn1, _, conv2, bn2, _ = seq
    for mod, idx in ((conv1, 0), (conv2, 3)):
        mod.weight.copy_(sd[f"{prefix}.{idx}.weight"])
    for mod, idx in ((bn1, 1), (bn2, 4)):
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            getattr(mod, attr).copy_(sd[f"{prefix}.{idx}.{attr}"])


def test_load_seed_weights_2d_equals_writing_by_hand():
    gen = torch.Generator().manual_seed(0)
    sd = _seed_2d_state_dict(3, 4, 4, gen)
    loaded = load_seed_weights(UNet(3, 1, base_channels=4, depth=4), sd).eval()
    by_hand = UNet(3, 1, base_channels=4, depth=4).eval()
    with torch.no_grad():
        _write_double_conv(by_hand.inc, sd, "inc.double_conv")
        for k in range(4):
            _write_double_conv(by_hand.downs[k], sd, f"down{k + 1}.maxpool_conv.1.double_conv")
            by_hand.ups[k].up.weight.copy_(sd[f"up{k + 1}.up.weight"])
            by_hand.ups[k].up.bias.copy_(sd[f"up{k + 1}.up.bias"])
            _write_double_conv(by_hand.ups[k].conv, sd, f"up{k + 1}.conv.double_conv")
        by_hand.outc.weight.copy_(sd["outc.conv.weight"])
        by_hand.outc.bias.copy_(sd["outc.conv.bias"])
        x = torch.rand(2, 3, 35, 33)
        y = loaded(x)
        torch.testing.assert_close(y, by_hand(x), rtol=0, atol=0)
        # and the weights matter: a fresh network answers differently
        assert not torch.allclose(y, UNet(3, 1, base_channels=4, depth=4).eval()(x))
    # a DataParallel prefix is accepted
    load_seed_weights(UNet(3, 1, base_channels=4, depth=4), {f"module.{k}": v for k, v in sd.items()})


def test_load_seed_weights_rejects_missing_extra_and_misshaped_keys():
    sd = _seed_2d_state_dict(3, 4, 2, torch.Generator().manual_seed(1))
    model = UNet(3, 1, base_channels=4, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = dict(sd)
    del missing["up2.up.bias"]
    with pytest.raises(ValueError, match=r"1 missing \['up2.up.bias'\]"):
        load_seed_weights(model, missing)
    with pytest.raises(ValueError, match=r"1 unexpected \['down3.maxpool_conv.1.double_conv.0.weight'\]"):
        load_seed_weights(model, {**sd, "down3.maxpool_conv.1.double_conv.0.weight": torch.zeros(1)})
    bad = {**sd, "outc.conv.weight": torch.zeros(2, 4, 1, 1)}
    with pytest.raises(ValueError, match=r"1 shape mismatches \['outc.conv.weight \(2, 4, 1, 1\) vs \(1, 4, 1, 1\)'\]"):
        load_seed_weights(model, bad)
    with pytest.raises(ValueError, match="seed weights do not fit UNet: .* missing"):
        load_seed_weights(model, _seed_2d_state_dict(3, 4, 3, torch.Generator().manual_seed(1)))
    # nothing half-written
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="expects a networks.unet.UNet or UNet3D"):
        load_seed_weights(BilinearUNet(3, 1, 4, 2), sd)


def test_load_seed_weights_3d_release_keys():
    gen = torch.Generator().manual_seed(2)
    f, sd = [2, 4, 8], {}

    def unet_conv3(prefix: str, i: int, o: int) -> None:
        for n, a in (("conv1", i), ("conv2", o)):
            sd[f"{prefix}.{n}.0.weight"] = torch.randn(o, a, 3, 3, 3, generator=gen) * 0.3
            sd[f"{prefix}.{n}.0.bias"] = torch.randn(o, generator=gen) * 0.1

    unet_conv3("conv1", 3, f[0])
    unet_conv3("conv2", f[0], f[1])
    unet_conv3("center", f[1], f[2])
    unet_conv3("up_concat2.conv", f[2] + f[1], f[1])
    unet_conv3("up_concat1.conv", f[1] + f[0], f[0])
    sd["final.weight"], sd["final.bias"] = torch.randn(1, f[0], 1, 1, 1, generator=gen), torch.randn(1, generator=gen)
    loaded = load_seed_weights(UNet3D(3, 1, base_channels=2, depth=2), sd).eval()
    by_hand = UNet3D(3, 1, base_channels=2, depth=2).eval()
    with torch.no_grad():
        for block, prefix in ((by_hand.encoders[0], "conv1"), (by_hand.encoders[1], "conv2"),
                              (by_hand.center, "center"), (by_hand.ups[0].conv, "up_concat2.conv"),
                              (by_hand.ups[1].conv, "up_concat1.conv")):
            block[0].weight.copy_(sd[f"{prefix}.conv1.0.weight"])
            block[0].bias.copy_(sd[f"{prefix}.conv1.0.bias"])
            block[3].weight.copy_(sd[f"{prefix}.conv2.0.weight"])
            block[3].bias.copy_(sd[f"{prefix}.conv2.0.bias"])
        by_hand.final.weight.copy_(sd["final.weight"])
        by_hand.final.bias.copy_(sd["final.bias"])
        x = torch.rand(1, 3, 12, 8, 9)
        torch.testing.assert_close(loaded(x), by_hand(x), rtol=0, atol=0)
    del sd["center.conv2.0.bias"]
    with pytest.raises(ValueError, match=r"1 missing \['center.conv2.0.bias'\]"):
        load_seed_weights(UNet3D(3, 1, base_channels=2, depth=2), sd)


# --------------------------------------------------------------------------- checkpoint format


@pytest.mark.parametrize("name,salience,shape,v2_name", [
    ("unet", "offline", (1, 3, 20, 20), "unet_bilinear"),
    ("unet3d", "e2e", (1, 1, 12, 12, 8), "unet3d_bilinear"),
])
def test_format_v1_checkpoint_rebuilds_the_bilinear_network(tmp_path, name, salience, shape, v2_name):
    """A checkpoint written the old way (format v1, "unet" = bilinear U-Net) still loads as trained."""
    torch.manual_seed(0)
    kw = {"base_channels": 4, "depth": 2}
    old = build_segmenter(v2_name, salience, model_kwargs=kw)  # the network v1 called `name`
    old.train()
    old(torch.rand(shape) * 3)
    old.eval()
    path = tmp_path / "v1.pth"
    torch.save({
        "format": LEGACY_FORMAT_V1, "model_name": name, "model_kwargs": kw, "in_channels": shape[1],
        "out_channels": 1, "spatial_dims": len(shape) - 2, "salience": salience, "head_sha256": None,
        "img_size": [20, 20] if len(shape) == 4 else None, "patch_size": None if len(shape) == 4 else [12, 12, 8],
        "config": {}, "state_dict": old.state_dict(), "epoch": 1, "iteration": 2, "best_metric": 0.1,
        "optimizer": None, "scheduler": None, "scaler": None,
    }, path)
    rebuilt, ckpt = load_model(path)
    assert ckpt["model_name"] == v2_name and ckpt["format"] == FORMAT and ckpt["code_version"] == "unknown"
    backbone = rebuilt.backbone if salience == "e2e" else rebuilt
    assert isinstance(backbone, BilinearUNet)
    x = torch.rand(shape)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), old(x), rtol=0, atol=0)


def test_checkpoint_stores_resolved_kwargs_and_survives_a_changed_default(tmp_path, monkeypatch):
    def _tmp(in_channels: int, out_channels: int, width: int = 3, kernel: int = 1) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(in_channels, width, kernel), torch.nn.Conv2d(width, out_channels, 1))

    # registered for this test only (monkeypatch removes it at teardown)
    monkeypatch.setitem(registry._REGISTRY, "_tmp_width_net", registry.ModelSpec("_tmp_width_net", _tmp, 2, "t"))
    model = build_segmenter("_tmp_width_net", "none", model_kwargs={"kernel": 1})
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, model_name="_tmp_width_net", model_kwargs={"kernel": 1}, salience="none",
                    config={}, epoch=0, iteration=0, best_metric=0.0)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model_kwargs"] == {"width": 3, "kernel": 1}
    assert ckpt["code_version"] == code_version() != ""

    def _tmp_wider(in_channels: int, out_channels: int, width: int = 5, kernel: int = 1) -> torch.nn.Module:
        return _tmp(in_channels, out_channels, width, kernel)

    monkeypatch.setitem(registry._REGISTRY, "_tmp_width_net", registry.ModelSpec("_tmp_width_net", _tmp_wider, 2, "t"))
    assert build_model("_tmp_width_net", 1, 1)[0].out_channels == 5  # the default did change
    rebuilt, _ = load_model(path)
    assert rebuilt[0].out_channels == 3
    x = torch.rand(1, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_code_version_outside_git_is_unknown(monkeypatch, tmp_path):
    import networks.checkpoint as checkpoint

    code_version.cache_clear()
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no_repo"))
    try:
        assert checkpoint.code_version() == "unknown"
    finally:
        code_version.cache_clear()


@pytest.mark.parametrize("name", [n for n in list_models() if n in TINY])
def test_resolved_kwargs_are_plain_and_rebuild_the_same_network(name):
    kw = TINY[name]
    resolved = resolve_kwargs(name, **kw)
    assert set(kw) <= set(resolved)
    buf = io.BytesIO()
    torch.save(resolved, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == resolved
    a, b = build_model(name, 3, 1, **kw), build_model(name, 3, 1, **resolved)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
    with pytest.raises(ValueError, match="unknown keyword"):
        resolve_kwargs(name, no_such_arg=1)


def test_resolved_kwargs_fill_every_default():
    assert resolve_kwargs("unet") == {"base_channels": 64, "depth": 4}
    r = resolve_kwargs("monai:SegResNet", init_filters=4)
    assert r["spatial_dims"] == 3 and r["init_filters"] == 4 and r["upsample_mode"] == "nontrainable"
    assert type(r["upsample_mode"]) is str
    assert resolve_kwargs("monai:UNet")["channels"] == [16, 32, 64, 128, 256]
    # the form --model_kwargs (JSON) gives, so a resumed run's arguments compare equal
    assert resolve_kwargs("unext", channels=(4, 4, 8)) == resolve_kwargs("unext", channels=[4, 4, 8])
    assert set(TESTED_MONAI) >= {"SegResNet", "UNet"}


def test_a_plugin_backbones_checkpoint_names_its_source(tmp_path, monkeypatch, caplog):
    import logging

    def _plug(in_channels: int, out_channels: int) -> torch.nn.Module:
        return torch.nn.Conv2d(in_channels, out_channels, 1)

    import types

    # as a module dropped in networks/plugins/ is named and loaded (its source: this file)
    module = types.ModuleType("networks.plugins._tmp_plug")
    module.__file__ = __file__
    monkeypatch.setitem(sys.modules, module.__name__, module)
    _plug.__module__ = module.__name__
    monkeypatch.setitem(registry._REGISTRY, "_tmp_plug", registry.ModelSpec("_tmp_plug", _plug, 2, "t"))
    real_source = registry.backbone_source  # monkeypatched below
    src = real_source("_tmp_plug")
    assert src["file"] == "tests/test_networks.py" and len(src["sha256"]) == 64
    assert registry.backbone_source("unet") is None  # built-in: the commit names its code
    path = tmp_path / "m.pth"
    save_checkpoint(path, build_segmenter("_tmp_plug", "none"), model_name="_tmp_plug", model_kwargs={},
                    salience="none", config={}, epoch=0, iteration=0, best_metric=0.0)
    assert torch.load(path, weights_only=True)["backbone_source"] == src
    load_model(path)  # registered and unchanged: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # the plug-in's source changed since: loaded, with a warning naming it
    monkeypatch.setattr(registry, "backbone_source", lambda name: {**src, "sha256": "0" * 64})
    monkeypatch.setattr("networks.checkpoint.backbone_source", registry.backbone_source)
    with caplog.at_level(logging.WARNING):
        load_model(path)
    assert any("tests/test_networks.py that defines backbone '_tmp_plug' changed" in r.getMessage()
               for r in caplog.records)
    # the plug-in file gone: the error names the checkpoint and the file to put back
    monkeypatch.setattr("networks.checkpoint.backbone_source", lambda name: None)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # registered still, by other code: loaded, with a warning
        load_model(path)
    assert any("here other code registers it" in r.getMessage() for r in caplog.records)
    monkeypatch.delitem(registry._REGISTRY, "_tmp_plug")
    with pytest.raises(ValueError, match=r"m.pth: its backbone '_tmp_plug' came from the plug-in "
                                         r"tests/test_networks.py .* put that file in networks/plugins/"):
        load_model(path)
    # builders that are partials or callable objects of a plug-in module are plug-ins too, and
    # one without a source file gives no source, not an error
    import functools

    class _Builder:
        def __call__(self, in_channels: int, out_channels: int) -> torch.nn.Module:
            return torch.nn.Conv2d(in_channels, out_channels, 1)

    _Builder.__module__ = module.__name__
    for name, fn in (("_tmp_partial", functools.partial(_plug)), ("_tmp_object", _Builder())):
        monkeypatch.setitem(registry._REGISTRY, name, registry.ModelSpec(name, fn, 2, "t"))
        assert real_source(name)["file"] == "tests/test_networks.py", name
    assert "_tmp_partial" in registry.plugin_names(2) and "_tmp_object" not in registry.plugin_names(3)
    monkeypatch.setattr(module, "__file__", None)
    assert real_source("_tmp_object") is None


def test_a_broken_plugin_is_skipped_with_one_line(tmp_path, monkeypatch, caplog):
    import logging

    import networks.plugins as plugins

    (tmp_path / "_tmp_broken.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.setattr(plugins, "__path__", [*plugins.__path__, str(tmp_path)])
    with caplog.at_level(logging.ERROR):
        registry._import_plugins()  # the other plug-ins load; no exception
    (msg,) = [r.getMessage() for r in caplog.records if "_tmp_broken" in r.getMessage()]
    assert "networks/plugins/_tmp_broken.py: not loaded" in msg and "ModuleNotFoundError" in msg
    assert "example_fcn" in registry.list_models()
