"""TransUNet (Chen et al. 2021): R50 encoder, ViT on the bottleneck tokens, cascaded up-sampler.

Layout, 2-D: input (B, C, H, W) with H, W multiples of 16 (the registry pads to it) ->
logits (B, out_channels, H, W). Defaults are the paper's R50-ViT-B/16 (no pretrained weights
are downloaded; the network starts from random initialisation):

- CNN encoder (ResNet-50 v2 as in BiT / the paper: weight-standardised convs, GroupNorm):
  root conv 7x7 stride 2 (``base_channels`` = 64) -> GN -> ReLU  [skip, H/2];
  3x3 max-pool stride 2; three stages of bottleneck units (``block_units`` = (3, 4, 9)) with
  4, 8, 16 x base_channels outputs at H/4 [skip], H/8 [skip], H/16.
- Transformer: 1x1 patch embedding of the H/16 map to ``hidden_size`` (768) tokens plus learnt
  position embeddings for an ``img_size`` (224) input, bilinearly resized when the token grid
  differs; ``num_layers`` (12) pre-norm layers of ``num_heads`` (12) -head self-attention and
  an MLP of ``mlp_dim`` (3072, GELU), dropout 0.1; final LayerNorm.
- Cascaded up-sampler: tokens back to (hidden, H/16, W/16), conv 3x3 to ``head_channels``
  (512); four steps of x2 bilinear up-sampling, concatenation with the skip of that size (none
  at full size), two conv 3x3-BN-ReLU to ``decoder_channels`` (256, 128, 64, 16); a 3x3
  conv to the logits.

Difference from the authors' code: their root max-pool has no padding and they zero-pad the
skips afterwards; here the pool pads by 1 so every stage is exactly H / 2**k.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DIVISOR = 16


def _gn(c: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ``c`` below that for small widths."""
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (per output channel: zero mean, unit variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class Bottleneck(nn.Module):
    """ResNet v2 bottleneck unit: 1x1 -> 3x3 (stride) -> 1x1, GN + ReLU, projected residual."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.gn1 = StdConv2d(cin, cmid, 1, bias=False), _gn(cmid)
        self.conv2, self.gn2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, bias=False), _gn(cmid)
        self.conv3, self.gn3 = StdConv2d(cmid, cout, 1, bias=False), _gn(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(StdConv2d(cin, cout, 1, stride=stride, bias=False), _gn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.proj is None else self.proj(x)
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return F.relu(residual + self.gn3(self.conv3(y)))


class ResNetEncoder(nn.Module):
    """(B, C, H, W) -> (H/16 map of 16*w channels, [H/8 (8w), H/4 (4w), H/2 (w)] skips)."""

    def __init__(self, in_channels: int, width: int, block_units: Sequence[int]) -> None:
        super().__init__()
        self.root = nn.Sequential(StdConv2d(in_channels, width, 7, stride=2, padding=3, bias=False), _gn(width),
                                  nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        cin = width
        for i, n in enumerate(block_units):
            cout, cmid = width * 4 * 2**i, width * 2**i
            units = [Bottleneck(cin, cout, cmid, 1 if i == 0 else 2)]
            units += [Bottleneck(cout, cout, cmid, 1) for _ in range(n - 1)]
            self.stages.append(nn.Sequential(*units))
            cin = cout
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.root(x)
        skips = [x]
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        skips.pop()  # the deepest map goes to the transformer, not to a skip
        return x, skips[::-1]


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """x2 bilinear up-sampling, concatenate the skip (if any), two conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(ConvBNReLU(cin + cskip, cout), ConvBNReLU(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class TransUNet(nn.Module):
    """TransUNet (R50-ViT); see the module docstring. Input sides must be multiples of 16."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int = 224,
        base_channels: int = 64,
        block_units: Sequence[int] = (3, 4, 9),
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
    ) -> None:
        super().__init__()
        block_units, decoder_channels = tuple(int(b) for b in block_units), tuple(int(c) for c in decoder_channels)
        if len(block_units) != 3 or min(block_units) < 1:
            raise ValueError(f"TransUNet: block_units needs 3 positive counts, got {block_units}")
        if len(decoder_channels) != 4 or min(decoder_channels) < 1:
            raise ValueError(f"TransUNet: decoder_channels needs 4 positive widths, got {decoder_channels}")
        if img_size < DIVISOR or img_size % DIVISOR:
            raise ValueError(f"TransUNet: img_size must be a positive multiple of {DIVISOR}, got {img_size}")
        if hidden_size % num_heads:
            raise ValueError(f"TransUNet: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.encoder = ResNetEncoder(in_channels, base_channels, block_units)
        self.patch_embed = nn.Conv2d(self.encoder.out_channels, hidden_size, 1)
        grid = img_size // DIVISOR
        self.pos_embed = nn.Parameter(torch.zeros(1, hidden_size, grid, grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.embed_drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, mlp_dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.conv_more = ConvBNReLU(hidden_size, head_channels)
        skip_channels = (base_channels * 8, base_channels * 4, base_channels, 0)
        ins = (head_channels,) + decoder_channels[:-1]
        self.decoder = nn.ModuleList(DecoderBlock(ci, cs, co) for ci, cs, co in zip(ins, skip_channels, decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[2] % DIVISOR or x.shape[3] % DIVISOR:
            raise ValueError(f"TransUNet expects (B, C, H, W) with H, W multiples of {DIVISOR}, got {tuple(x.shape)}")
        feat, skips = self.encoder(x)
        feat = self.patch_embed(feat)                              # (B, hidden, h, w)
        b, c, h, w = feat.shape
        pos = self.pos_embed
        if pos.shape[2:] != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        tokens = self.embed_drop((feat + pos).flatten(2).transpose(1, 2))  # (B, h*w, hidden)
        tokens = self.norm(self.transformer(tokens))
        x = self.conv_more(tokens.transpose(1, 2).reshape(b, c, h, w))
        for block, skip in zip(self.decoder, skips + [None]):
            x = block(x, skip)
        return self.head(x)
