"""UNeXt (Valanarasu and Patel, MICCAI 2022): conv stages, then tokenised MLP stages.

Layout, 2-D: input (B, C, H, W) with H, W multiples of 32 (the registry pads to it) ->
logits (B, out_channels, H, W). Default sizes are those of the authors' code
(jeya-maria-jose/UNeXt-pytorch), 1,471,921 parameters: the paper's 1.47M.

- Encoder, three conv stages: conv 3x3 -> BatchNorm -> 2x2 max-pool -> ReLU, channels
  ``channels = (16, 32, 128)`` at H/2, H/4, H/8.
- Two tokenised MLP stages: overlapping patch embedding (conv 3x3, stride 2) to
  ``embed_dims = (160, 256)`` channels at H/16 and H/32 (the bottleneck), LayerNorm over
  channels, one shifted-MLP block, LayerNorm.
- Shifted-MLP block (tokens T, B x N x C, on an h x w grid), pre-norm residual
  T + MLP(LN(T)): shift the channels along the width (channel groups moved by
  -2..2 pixels, zeros shifted in) -> linear C -> C*mlp_ratio -> depthwise 3x3 conv on the
  token grid -> GELU -> shift along the height -> linear back to C. (The paper's order,
  width then height; the authors' code shifts along the height first.)
- Decoder: five steps of conv 3x3 (-> BatchNorm) -> x2 bilinear -> ReLU, each added to the
  encoder map of the same size (not concatenated); the two deepest additions are followed by
  a shifted-MLP block + LayerNorm as in the encoder; a 1x1 conv gives the logits.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DIVISOR = 32  # five stride-2 steps


def shift_tokens(x: torch.Tensor, axis: int, shift_size: int) -> torch.Tensor:
    """Shift channel groups of ``x`` (B, C, h, w) along ``axis`` (2 or 3) by -s..s pixels, zero fill.

    The C channels are split into ``shift_size`` groups (``torch.chunk``); group g moves by
    g - shift_size // 2 pixels, so with shift_size 5 the groups move by -2, -1, 0, 1, 2.
    """
    pad = shift_size // 2
    out = []
    for g, chunk in enumerate(torch.chunk(x, shift_size, dim=1)):
        s = g - pad
        if s == 0:
            out.append(chunk)
            continue
        n = chunk.shape[axis]
        if n <= abs(s):
            out.append(torch.zeros_like(chunk))
            continue
        widths = [0, 0, 0, 0]  # F.pad order: (w_before, w_after, h_before, h_after)
        k = 0 if axis == 3 else 2
        widths[k], widths[k + 1] = max(0, s), max(0, -s)
        out.append(F.pad(chunk.narrow(axis, max(0, -s), n - abs(s)), widths))
    return torch.cat(out, dim=1)


class ShiftedMLP(nn.Module):
    """Tokens (B, N, C) on an (h, w) grid -> (B, N, C): shift W, fc1, DWConv, GELU, shift H, fc2."""

    def __init__(self, dim: int, mlp_ratio: float, shift_size: int, drop: float) -> None:
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.shift_size = shift_size
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = t.shape
        x = shift_tokens(t.transpose(1, 2).reshape(b, c, h, w), 3, self.shift_size)
        x = self.fc1(x.flatten(2).transpose(1, 2))
        x = self.dwconv(x.transpose(1, 2).reshape(b, -1, h, w))
        x = self.drop(self.act(x))
        x = shift_tokens(x, 2, self.shift_size)
        return self.drop(self.fc2(x.flatten(2).transpose(1, 2)))


class TokMLPStage(nn.Module):
    """Shifted-MLP block (pre-norm residual) then LayerNorm, on a (B, C, h, w) map."""

    def __init__(self, dim: int, mlp_ratio: float, shift_size: int, drop: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.mlp = ShiftedMLP(dim, mlp_ratio, shift_size, drop)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.mlp(self.norm_in(t), h, w)
        return self.norm_out(t).transpose(1, 2).reshape(b, c, h, w)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: conv 3x3 stride 2, LayerNorm over channels; (B, C, h, w) -> (B, D, h/2, w/2)."""

    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class UNeXt(nn.Module):
    """UNeXt; see the module docstring. Input sides must be multiples of 32."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 128),
        embed_dims: Sequence[int] = (160, 256),
        mlp_ratio: float = 1.0,
        shift_size: int = 5,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        channels, embed_dims = tuple(int(c) for c in channels), tuple(int(c) for c in embed_dims)
        if len(channels) != 3 or len(embed_dims) != 2 or min(channels + embed_dims) < 1:
            raise ValueError(f"UNeXt: channels needs 3 and embed_dims 2 positive sizes, got {channels}, {embed_dims}")
        if shift_size < 1 or shift_size % 2 == 0:
            raise ValueError(f"UNeXt: shift_size must be odd and >= 1, got {shift_size}")
        c1, c2, c3 = channels
        e1, e2 = embed_dims
        self.enc = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))
            for cin, cout in ((in_channels, c1), (c1, c2), (c2, c3)))
        self.embed4, self.embed5 = PatchEmbed(c3, e1), PatchEmbed(e1, e2)
        self.tok4 = TokMLPStage(e1, mlp_ratio, shift_size, drop_rate)
        self.tok5 = TokMLPStage(e2, mlp_ratio, shift_size, drop_rate)
        # decoder conv i maps stage i+1's width to stage i's (the last keeps c1)
        self.dec = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))
            for cin, cout in ((e2, e1), (e1, c3), (c3, c2), (c2, c1)))
        self.dec_last = nn.Conv2d(c1, c1, 3, padding=1)
        self.dtok4 = TokMLPStage(e1, mlp_ratio, shift_size, drop_rate)
        self.dtok3 = TokMLPStage(c3, mlp_ratio, shift_size, drop_rate)
        self.final = nn.Conv2d(c1, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[2] % DIVISOR or x.shape[3] % DIVISOR:
            raise ValueError(f"UNeXt expects (B, C, H, W) with H, W multiples of {DIVISOR}, got {tuple(x.shape)}")
        skips = []
        for enc in self.enc:
            x = F.relu(F.max_pool2d(enc(x), 2))
            skips.append(x)                              # H/2, H/4, H/8
        x = self.tok4(self.embed4(x))
        skips.append(x)                                  # H/16
        x = self.tok5(self.embed5(x))                    # H/32
        post = {0: self.dtok4, 1: self.dtok3}
        for i, dec in enumerate(self.dec):
            x = F.relu(F.interpolate(dec(x), scale_factor=2, mode="bilinear"))
            x = x + skips[-1 - i]
            if i in post:
                x = post[i](x)
        x = F.relu(F.interpolate(self.dec_last(x), scale_factor=2, mode="bilinear"))
        return self.final(x)
