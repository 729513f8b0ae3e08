"""U-Nets: the seed's 2-D U-Net, the latest release's 3-D U-Net, and the earlier bilinear variant.

``UNet`` (registry name ``unet``) is exactly the network the seed trained: ``UNet(n_channels,
n_classes)`` of the widely used PyTorch-UNet (milesial) with ``bilinear=False``. Four down steps
of 2x2 max-pool + two (3x3 conv, no bias -> BatchNorm -> ReLU); a bottleneck of
``base_channels * 2**depth`` channels (1024 for the seed); four up steps of
ConvTranspose2d(c, c/2, 2, stride 2), the up-sampled map zero-padded to its skip's size and
concatenated as ``cat([skip, up])``, then two conv-BN-ReLU; a 1x1 output conv. 31,037,633
parameters for 3 -> 1 channels at ``base_channels=64, depth=4``.

``UNet3D`` (``unet3d``) is ``UNet_3D`` of the authors' latest release (lzhLab/ConSalience,
``networks/unet3d.py``, commit 218eced, from ozan-oktay/Attention-Gated-Networks): widths
``base_channels * (1, 2, 4, 8, 16)`` with ``base_channels=16`` (their 64 / feature_scale 4), two
(3x3x3 conv with bias -> InstanceNorm3d without affine -> ReLU) per level, 2x2x2 max-pool,
trilinear up-sampling (align_corners=True, channels kept), ``cat([skip, up])``, Dropout(0.3) on
the bottleneck and on the last decoder output, 1x1x1 output conv.

``BilinearUNet`` (``unet_bilinear``, ``unet3d_bilinear``) is the network this project called
``unet``/``unet3d`` before checkpoint format v2: bilinear up-sampling, bottleneck halved.

Tensors: 2-D (B, C, H, W) -> logits (B, out_channels, H, W); 3-D (B, C, H, W, D) ->
(B, out_channels, H, W, D). Any input size works: an up-sampled map is zero-padded to its skip
connection's size, so sizes need not be multiples of 2**depth.

``load_seed_weights(model, state_dict)`` copies a seed / release checkpoint (their key names)
into ``UNet`` or ``UNet3D``.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_MODE = {2: "bilinear", 3: "trilinear"}


def _check_sizes(depth: int, base_channels: int) -> None:
    if depth < 1 or base_channels < 1:
        raise ValueError(f"depth and base_channels must be >= 1, got {depth}, {base_channels}")


def _check_input(x: torch.Tensor, dims: int, what: str) -> None:
    if x.ndim != dims + 2:
        raise ValueError(f"{what}({dims}-D) expects a {dims + 2}-D tensor, got {tuple(x.shape)}")


def pad_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Zero-pad the spatial axes of ``x`` (B, C, *s) to ``ref``'s, half before, half after."""
    pad: list[int] = []
    for ax in range(x.ndim - 1, 1, -1):
        diff = ref.shape[ax] - x.shape[ax]
        pad += [diff // 2, diff - diff // 2]
    return F.pad(x, pad) if any(pad) else x


class DoubleConv(nn.Sequential):
    """Two (conv 3x3, no bias -> batch norm -> ReLU); indices 0, 1, 3, 4 hold the weights."""

    def __init__(self, dims: int, cin: int, cout: int, mid: int | None = None) -> None:
        mid = mid or cout
        conv, norm = _CONV[dims], _NORM[dims]
        super().__init__(
            conv(cin, mid, 3, padding=1, bias=False), norm(mid), nn.ReLU(inplace=True),
            conv(mid, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
        )


# --------------------------------------------------------------------------- the seed's 2-D U-Net


class UpTransposed(nn.Module):
    """ConvTranspose2d(cin, cin/2, 2, stride 2), pad to the skip, ``cat([skip, up])``, double conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(2, cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, pad_to(self.up(x), skip)], dim=1))


def _encode_decode(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The U-Net pass shared by :class:`UNet` and :class:`BilinearUNet`: ``inc``, then each of
    ``downs`` after ``pool`` (keeping skips), then each of ``ups`` with its skip, then ``outc``."""
    skips = [net.inc(x)]
    for down in net.downs:
        skips.append(down(net.pool(skips[-1])))
    x = skips.pop()
    for up in net.ups:
        x = up(x, skips.pop())
    return net.outc(x)


class UNet(nn.Module):
    """The seed's 2-D U-Net (milesial PyTorch-UNet, ``bilinear=False``); see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 64, depth: int = 4) -> None:
        super().__init__()
        _check_sizes(depth, base_channels)
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(2, in_channels, widths[0])
        self.pool = nn.MaxPool2d(2)
        self.downs = nn.ModuleList(DoubleConv(2, widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(UpTransposed(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 2, "UNet")
        return _encode_decode(self, x)


# --------------------------------------------------------------------------- the release's 3-D U-Net


class ConvIN3d(nn.Sequential):
    """Two (conv 3x3x3 with bias -> InstanceNorm3d, no affine -> ReLU): the release's UnetConv3."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout), nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout), nn.ReLU(inplace=True),
        )


class UpTrilinear(nn.Module):
    """Trilinear x2 (channels kept), pad to the skip, ``cat([skip, up])``, ConvIN3d(cin + cout -> cout)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvIN3d(cin + cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
        return self.conv(torch.cat([skip, pad_to(x, skip)], dim=1))


class UNet3D(nn.Module):
    """The latest release's 3-D U-Net (``UNet_3D``); see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 16, depth: int = 4,
                 dropout: float = 0.3) -> None:
        super().__init__()
        _check_sizes(depth, base_channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            ConvIN3d(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth))
        self.pool = nn.MaxPool3d(2)
        self.center = ConvIN3d(widths[depth - 1], widths[depth])
        self.ups = nn.ModuleList(UpTrilinear(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.drop_center = nn.Dropout(dropout)
        self.drop_out = nn.Dropout(dropout)
        self.final = nn.Conv3d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, 3, "UNet3D")
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.drop_center(self.center(x))
        for up in self.ups:
            x = up(x, skips.pop())
        return self.final(self.drop_out(x))


# --------------------------------------------------------------------------- bilinear variant (format v1)


class UpBilinear(nn.Module):
    """Up-sample by 2 (bi/trilinear, align_corners), pad to the skip, concatenate, double conv."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        self.dims = dims
        self.conv = DoubleConv(dims, cin, cout, cin // 2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode=_MODE[self.dims], align_corners=True)
        return self.conv(torch.cat([skip, pad_to(x, skip)], dim=1))


class BilinearUNet(nn.Module):
    """U-Net with bilinear up-sampling, bottleneck halved (milesial ``bilinear=True``), 2-D or 3-D.

    Widths ``base_channels * (1, 2, 4, 8, 16)``, the last halved; 17.3M parameters at base 64 in
    2-D. This was ``unet``/``unet3d`` in checkpoints of format v1; their state-dict keys
    (``inc``, ``downs``, ``ups``, ``outc``) are unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 64, depth: int = 4,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        _check_sizes(depth, base_channels)
        d = spatial_dims
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.spatial_dims = d
        self.inc = DoubleConv(d, in_channels, widths[0])
        self.pool = _POOL[d](2)
        # bilinear up-sampling keeps channels, so each encoder output is halved to match its skip
        self.downs = nn.ModuleList(
            DoubleConv(d, widths[i], widths[i + 1] // (2 if i == depth - 1 else 1)) for i in range(depth)
        )
        self.ups = nn.ModuleList()
        for i in range(depth, 0, -1):
            cin = widths[i - 1] * 2
            cout = widths[i - 2] if i > 1 else widths[0]
            self.ups.append(UpBilinear(d, cin, cout))
        self.outc = _CONV[d](widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.spatial_dims, "BilinearUNet")
        return _encode_decode(self, x)


# --------------------------------------------------------------------------- seed / release weights

_CONV_BN = ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
            "3.weight", "4.weight", "4.bias", "4.running_mean", "4.running_var", "4.num_batches_tracked")


def seed_key_map(model: nn.Module) -> dict[str, str]:
    """{seed / release state-dict key: our key} for a ``UNet`` or ``UNet3D`` of any depth.

    ``UNet`` (the seed's milesial keys): ``inc.double_conv.K``, ``down{i}.maxpool_conv.1.double_conv.K``,
    ``up{i}.up.{weight,bias}``, ``up{i}.conv.double_conv.K``, ``outc.conv.{weight,bias}`` with K the
    conv / BatchNorm entries at indices 0, 1, 3, 4 (running statistics included).
    ``UNet3D`` (the release's ``UNet_3D``): ``conv{i}.conv{1,2}.0.{weight,bias}``,
    ``center.conv{1,2}.0.*``, ``up_concat{i}.conv.conv{1,2}.0.*``, ``final.{weight,bias}``.
    """
    out: dict[str, str] = {}
    if isinstance(model, UNet):
        depth = len(model.downs)
        out.update({f"inc.double_conv.{k}": f"inc.{k}" for k in _CONV_BN})
        for i in range(depth):
            out.update({f"down{i + 1}.maxpool_conv.1.double_conv.{k}": f"downs.{i}.{k}" for k in _CONV_BN})
            # seed's up1 is the deepest decoder step, as is our ups[0]
            out.update({f"up{i + 1}.up.{p}": f"ups.{i}.up.{p}" for p in ("weight", "bias")})
            out.update({f"up{i + 1}.conv.double_conv.{k}": f"ups.{i}.conv.{k}" for k in _CONV_BN})
        out.update({f"outc.conv.{p}": f"outc.{p}" for p in ("weight", "bias")})
        return out
    if isinstance(model, UNet3D):
        depth = len(model.encoders)
        pairs = [(f"conv{i + 1}", f"encoders.{i}") for i in range(depth)] + [("center", "center")]
        # release's up_concat{depth} is the deepest decoder step, our ups[0]
        pairs += [(f"up_concat{depth - j}.conv", f"ups.{j}.conv") for j in range(depth)]
        for theirs, ours in pairs:
            for n, idx in (("conv1", 0), ("conv2", 3)):
                out.update({f"{theirs}.{n}.0.{p}": f"{ours}.{idx}.{p}" for p in ("weight", "bias")})
        out.update({f"final.{p}": f"final.{p}" for p in ("weight", "bias")})
        return out
    raise ValueError(f"load_seed_weights: expects a networks.unet.UNet or UNet3D, got {type(model).__name__}")


def load_seed_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy a seed ``UNet`` (or release ``UNet_3D``) state dict into ``model``; returns ``model``.

    Every key of ``state_dict`` must be used and every entry of ``model`` filled, shapes equal;
    otherwise a one-line ``ValueError`` naming the first offending keys (nothing is copied).
    A ``module.`` prefix (DataParallel) is stripped.
    """
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    mapping = seed_key_map(model)
    own = model.state_dict()
    if set(mapping.values()) != set(own):
        raise ValueError(f"load_seed_weights: key map does not cover {type(model).__name__} "
                         f"({sorted(set(own) ^ set(mapping.values()))[:3]})")
    missing = [k for k in mapping if k not in sd]
    extra = [k for k in sd if k not in mapping]
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[mapping[k]].shape)}" for k, v in sd.items()
           if k in mapping and tuple(v.shape) != tuple(own[mapping[k]].shape)]
    if missing or extra or bad:
        raise ValueError(f"seed weights do not fit {type(model).__name__}: {len(missing)} missing {missing[:3]}, "
                         f"{len(extra)} unexpected {extra[:3]}, {len(bad)} shape mismatches {bad[:3]}")
    model.load_state_dict({mapping[k]: v for k, v in sd.items()}, strict=True)
    return model
