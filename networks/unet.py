"""The seed's U-Net, in 2-D and 3-D.

The seed trained the classic U-Net (Ronneberger et al. 2015, in the widely used
PyTorch form): four down steps of max-pool + two 3x3 conv-BN-ReLU, four up steps of
bilinear up-sampling + concatenation + two conv-BN-ReLU, a 1x1 output conv. The
channel widths are ``base_channels * (1, 2, 4, 8, 16)`` (the bottleneck halved with
bilinear up-sampling, as in that implementation); the seed used ``base_channels=64``.

Tensors: 2-D (B, C, H, W) -> logits (B, out_channels, H, W); 3-D (B, C, H, W, D) ->
(B, out_channels, H, W, D). Any input size works: the decoder pads an up-sampled map
to its skip connection's size, so sizes need not be multiples of 2**depth.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_MODE = {2: "bilinear", 3: "trilinear"}


class DoubleConv(nn.Sequential):
    """Two (conv 3x3 -> batch norm -> ReLU)."""

    def __init__(self, dims: int, cin: int, cout: int, mid: int | None = None) -> None:
        mid = mid or cout
        conv, norm = _CONV[dims], _NORM[dims]
        super().__init__(
            conv(cin, mid, 3, padding=1, bias=False), norm(mid), nn.ReLU(inplace=True),
            conv(mid, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Up-sample by 2, pad to the skip's size, concatenate, double conv."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        self.dims = dims
        self.conv = DoubleConv(dims, cin, cout, cin // 2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode=_MODE[self.dims], align_corners=True)
        # odd sizes: the pooled map lost a row/column, give it back as zeros
        pad: list[int] = []
        for ax in range(x.ndim - 1, 1, -1):
            diff = skip.shape[ax] - x.shape[ax]
            pad += [diff // 2, diff - diff // 2]
        if any(pad):
            x = F.pad(x, pad)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Classic U-Net for ``spatial_dims`` 2 or 3 (see module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int = 64,
        depth: int = 4,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if depth < 1 or base_channels < 1:
            raise ValueError(f"depth and base_channels must be >= 1, got {depth}, {base_channels}")
        d = spatial_dims
        widths: Sequence[int] = [base_channels * 2**i for i in range(depth + 1)]
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
            self.ups.append(Up(d, cin, cout))
        self.outc = _CONV[d](widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"UNet({self.spatial_dims}-D) expects a {self.spatial_dims + 2}-D tensor, got {tuple(x.shape)}")
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)
