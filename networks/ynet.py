"""YNet as the authors' latest release defines it (lzhLab/ConSalience, networks/YNet.py, commit 218eced).

The release's ``YNet(in_channels, n_classes)`` (feature_scale 4) is a dual-encoder U-Net, not
the spatio-spectral Y-Net of Farshad et al. 2022 it cites (no Fourier convolutions):

- two identical encoders (m1, m2), each four levels of two (conv 3x3 with bias -> BatchNorm ->
  ReLU) and 2x2 max-pool, widths ``base_channels * (1, 2, 4, 8)`` (16, 32, 64, 128);
- per level a fusion block of two (conv 1x1 -> BatchNorm -> ReLU) on ``cat([m1, m2])``, back to
  the level's width: the skip connection;
- bottleneck: two conv-BN-ReLU (to 16 x base_channels = 256) on the SUM of the two pooled
  deepest encoder maps;
- decoder, four steps: ConvTranspose2d(c, c, 2, stride 2), resized to the skip (bilinear, as
  the release does when sizes differ), ``cat([skip, up])``, two (conv 3x3 -> ReLU) without
  BatchNorm; 1x1 conv to the logits.

Readings we had to make, because the release does not run as published:
- its ``UnetUp2`` builds ConvTranspose2d(c, c/2) yet sizes the following conv for c + c/2
  input channels, which fails at the first decoder step; we use ConvTranspose2d(c, c), as the
  same release's 2-D ``UNet_2D`` does, which is the only channel count its convs accept;
- its ``forward(inputs_m1, inputs_m2)`` takes two images but neither main.py nor the trainer
  of that release says which; the registry has one input, so both encoders see the same input
  tensor (B, in_channels, H, W) (with salience, the gated image).
Layout: (B, in_channels, H, W) -> logits (B, out_channels, H, W), any H, W.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Sequential):
    """Two (conv k x k with bias -> [BatchNorm] -> ReLU): the release's ``UnetConv2``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, batchnorm: bool = True) -> None:
        pad = kernel // 2
        layers: list[nn.Module] = []
        for a in (cin, cout):
            layers.append(nn.Conv2d(a, cout, kernel, padding=pad))
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Up(nn.Module):
    """ConvTranspose2d(cin, cin, 2, 2) -> resize to skip -> ``cat([skip, up])`` -> ConvBlock(cin + cout -> cout), no BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, 2, stride=2)
        self.conv = ConvBlock(cin + cout, cout, batchnorm=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[2:] != skip.shape[2:]:
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class YNet(nn.Module):
    """The release's dual-encoder YNet; see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 16) -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"YNet: base_channels must be >= 1, got {base_channels}")
        widths = [base_channels * 2**i for i in range(5)]
        self.enc_m1 = nn.ModuleList(ConvBlock(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(4))
        self.enc_m2 = nn.ModuleList(ConvBlock(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(4))
        self.fuse = nn.ModuleList(ConvBlock(2 * widths[i], widths[i], kernel=1) for i in range(4))
        self.center = ConvBlock(widths[3], widths[4])
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(4)))
        self.final = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"YNet expects a (B, C, H, W) tensor, got {tuple(x.shape)}")
        a, b, skips = x, x, []
        for enc1, enc2, fuse in zip(self.enc_m1, self.enc_m2, self.fuse):
            a, b = enc1(a), enc2(b)
            skips.append(fuse(torch.cat([a, b], dim=1)))
            a, b = F.max_pool2d(a, 2), F.max_pool2d(b, 2)
        y = self.center(a + b)
        for up in self.ups:
            y = up(y, skips.pop())
        return self.final(y)
