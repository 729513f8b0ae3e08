"""A minimal plug-in backbone: copy this file to add your own network."""
from __future__ import annotations

import torch.nn as nn

from networks.registry import register


@register("example_fcn", spatial_dims=2)
def example_fcn(in_channels: int, out_channels: int, width: int = 16, layers: int = 4) -> nn.Module:
    """A plain 2-D fully convolutional net: (B, in_channels, H, W) -> logits (B, out_channels, H, W)."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    blocks: list[nn.Module] = []
    c = in_channels
    for _ in range(layers):
        blocks += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
    blocks.append(nn.Conv2d(c, out_channels, 1))
    return nn.Sequential(*blocks)
