"""Connectivity-aware salience (docs/DESIGN.md sections 1 and 1b).

Pieces, in the order the method uses them:

- :func:`square_wave_bank`: the 60 fused oriented square-wave kernels, (60, 1, 11, 11),
  sizes k in {3, 5, 7, 9, 11} (major), orientations theta_i = i pi / 12 (minor).
- :class:`SalienceHead`: Conv 60->30 3x3, ReLU, Conv 30->30 3x3, ReLU, Conv 30->1 1x1,
  Sigmoid; state-dict keys ``out_conv.{0,2,4}.*``. :func:`load_head` reads it.
- :class:`SeedFPN`: the seed's released offline generator (section 1b); loads the
  authors' ``dice_best_Wavelet_square_net_vessel_data_size512.pth`` with ``strict=True``.
- Offline generators with one call convention (:class:`BankGenerator`,
  :class:`FPNGenerator`, :class:`AnalyticGenerator`), driven by :func:`salience_2d`
  (a batch of planes) and :func:`salience_3d` (a volume, three plane orientations).
- :class:`ResidualGate` (G + G * S) and :class:`SalienceModule`, the ``e2e`` module
  that sits inside a network (bank a fixed buffer, ``.head`` trainable).

Reference padding semantics. The authors filtered every plane inside a larger zero
canvas and cropped. Both networks have a receptive radius of 7 pixels, so a plane
zero-padded by 7 and filtered with *valid* convolutions gives exactly their values
(their layers see no canvas edge inside that radius; biases turn the zero margin into
a constant field, which the valid computation reproduces because it is computed from
the padded zeros). The generators here work that way, after folding every affine
prefix of the network (bank + first head conv; the nine fpn blocks + first up-conv +
BatchNorm) into one convolution, which is exact on the plane and 2.5x (bank) to 75x
(fpn) fewer operations than the layer-by-layer computation.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from utils.provenance import file_sha256
from utils.torch_io import load_torch_file

log = logging.getLogger(__name__)

BANK_SIZES: tuple[int, ...] = (3, 5, 7, 9, 11)
BANK_ORIENTATIONS = 12
SERIES_TERMS = 30
BANK_CHANNELS = len(BANK_SIZES) * BANK_ORIENTATIONS  # 60
KERNEL_SIZE = max(BANK_SIZES)  # 11
#: receptive radius of bank + head and of the seed's fpn, in pixels
RECEPTIVE_RADIUS = 7
#: zeros added around each plane by the reference semantics (docs/DESIGN.md: at least 8)
REFERENCE_MARGIN = 8
HEAD_FORMAT = "livervessel-salience-v1"
GENERATORS = ("bank", "fpn", "analytic")
#: how a plane is standardised and a volume's map normalised (docs/DESIGN.md section 1a):
#: ``volume``, the paper's: each plane over its own positive pixels, the map min-max over the
#: whole volume (both change with how far the scan extends); ``fixed``: every plane with the same
#: constants, the bank head's sigmoid kept as it is (the same voxel gets the same value whatever
#: the scan's extent). Checkpoints and maps that do not say are ``volume``.
NORMALISATIONS = ("volume", "fixed")
#: ``fixed`` standardisation g' = (g - mean) / std on g > 0, in image units (HU / 400): 100 HU and
#: 64 HU, the medians over the planes of real 3D-IRCADb patient 1 of the per-plane mean (0.25-0.27)
#: and std (0.14-0.19) of the positive pixels that ``volume`` uses
FIXED_MEAN = 100.0 / 400.0
FIXED_STD = 64.0 / 400.0
DEFAULT_MAX_BATCH_VOXELS = 1 << 21
#: padded pixels per :class:`BankGenerator` convolution call on the CPU: its 30-channel
#: intermediates (block x 30 x 4 bytes, about 8 MB) then stay in the last-level cache
BANK_CPU_BLOCK_PIXELS = 1 << 16
#: a CPU block is cropped to its non-zero part only when that part is under this share of it
CROP_MIN_SHARE = 0.9
_STD_RTOL = 1e-5
#: pixels per chunk of :class:`SalienceModule` on the CPU (:func:`_plane_chunks`): a 30-channel
#: map of a chunk is 31 MB, under glibc's 32 MB limit for reusing freed memory
E2E_CPU_BLOCK_PIXELS = 1 << 18
#: memory layout of :class:`SalienceModule`'s 30-channel maps on the CPU: in chunks, oneDNN's
#: 3x3 convolution of 30 channels is faster in NCHW than channels-last (weight gradient 1.7x)
E2E_CPU_LAYOUT = torch.contiguous_format

# Seed fpn blocks: (sigma, lambda, kernel k, dilation, padding), docs/DESIGN.md section 1b.
FPN_BLOCKS: tuple[tuple[float, float, int, int, int], ...] = (
    (5, 5, 5, 1, 2),
    (5, 2.5, 5, 1, 2),
    (5, 7.5, 5, 1, 2),
    (3, 3, 3, 1, 1),
    (3, 1.5, 3, 1, 1),
    (3, 6, 3, 1, 1),
    (3, 3, 5, 1, 2),
    (3, 3, 3, 2, 2),
    (5, 10, 5, 2, 4),
)


# ----------------------------------------------------------------------------- kernels
def square_wave(x: np.ndarray, parity: str, terms: int = SERIES_TERMS) -> np.ndarray:
    """Truncated Fourier series of the unit square wave of angular frequency 1 at phase ``x``.

    even: (4/pi) sum_j (-1)^j cos((2j+1) x) / (2j+1);  odd: (4/pi) sum_j sin((2j+1) x) / (2j+1).
    """
    j = np.arange(terms, dtype=np.float64).reshape((-1,) + (1,) * np.ndim(x))
    n = 2 * j + 1
    if parity == "even":
        return 4 / math.pi * np.sum((-1.0) ** j * np.cos(n * x) / n, axis=0)
    if parity == "odd":
        return 4 / math.pi * np.sum(np.sin(n * x) / n, axis=0)
    raise ValueError(f"parity must be 'even' or 'odd', got {parity!r}")


def oriented_kernel(k: int, sigma: float, lam: float, theta: float, parity: str) -> np.ndarray:
    """One oriented square-wave kernel (k, k) float64; index [row, col] <-> (v, u) = (row - c, col - c).

    ``parity`` is ``even``, ``odd`` or ``sum`` (even + odd, the bank's fused kernel).
    """
    c = k // 2
    v, u = np.meshgrid(np.arange(k) - c, np.arange(k) - c, indexing="ij")
    x = u * math.cos(theta) + v * math.sin(theta)
    y = -u * math.sin(theta) + v * math.cos(theta)
    window = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    phase = 2 * math.pi / lam * x
    if parity == "sum":
        wave = square_wave(phase, "even") + square_wave(phase, "odd")
    else:
        wave = square_wave(phase, parity)
    return window * wave


def bank_orientations() -> np.ndarray:
    """theta_i = i pi / 12, i = 0..11 (radians)."""
    return np.arange(BANK_ORIENTATIONS) * math.pi / BANK_ORIENTATIONS


def square_wave_bank(dtype: torch.dtype = torch.float32) -> Tensor:
    """The 60 fused (even + odd) kernels, (60, 1, 11, 11), size-major then orientation.

    Kernel of size k: sigma = k, lambda = k - 1, zero-padded to 11 x 11 and centred.
    """
    bank = np.zeros((BANK_CHANNELS, 1, KERNEL_SIZE, KERNEL_SIZE))
    for s, k in enumerate(BANK_SIZES):
        off = (KERNEL_SIZE - k) // 2
        for i, theta in enumerate(bank_orientations()):
            bank[s * BANK_ORIENTATIONS + i, 0, off : off + k, off : off + k] = oriented_kernel(
                k, sigma=k, lam=k - 1, theta=theta, parity="sum"
            )
    return torch.from_numpy(bank).to(dtype)


def bank_parameters() -> dict:
    """Self-description of the bank, stored in head checkpoints."""
    return {
        "sizes": list(BANK_SIZES),
        "orientations_rad": bank_orientations().tolist(),
        "sigma": "k",
        "lambda": "k - 1",
        "series_terms": SERIES_TERMS,
        "kernel": "W * (E + O), zero-padded to 11x11, size-major then orientation",
    }


def fpn_kernels(k: int, sigma: float, lam: float, parity: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed weights (12, 12, k, k) of one seed fpn block: Weight[o, c] = kernel of orientation o.

    Orientation o is used at angle 2 * (30 o) degrees; each kernel is divided by the sum of
    its positive entries.
    """
    if parity not in ("even", "odd"):
        raise ValueError(f"parity must be 'even' or 'odd', got {parity!r}")
    w = np.zeros((12, 12, k, k))
    for o in range(12):
        kern = oriented_kernel(k, sigma, lam, math.radians(2 * 30 * o), parity)
        w[o, :] = kern / kern[kern > 0].sum()
    return torch.from_numpy(w).to(dtype)


# ----------------------------------------------------------------------------- head
class SalienceHead(nn.Module):
    """Bank responses (N, 60, H, W) -> salience (N, 1, H, W) in (0, 1). Same-size convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.out_conv = nn.Sequential(
            nn.Conv2d(BANK_CHANNELS, 30, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(30, 30, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(30, 1, 1),
            nn.Sigmoid(),
        )

    def logits(self, x: Tensor) -> Tensor:
        """Pre-sigmoid output (N, 1, H, W), for numerically stable losses."""
        for layer in list(self.out_conv)[:-1]:
            x = layer(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != BANK_CHANNELS:
            raise ValueError(f"SalienceHead expects (N, {BANK_CHANNELS}, H, W), got {tuple(x.shape)}")
        return self.out_conv(x)


_HEAD_KEY = re.compile(r"^(.*?)out_conv\.(0|2|4)\.(weight|bias)$")


def _unwrap_state(obj: object, path: Path) -> dict:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict):
        return obj
    raise ValueError(f"{path}: not a state dict or checkpoint (got {type(obj).__name__})")


def head_state_from(state: dict, source: str = "state dict") -> dict:
    """The head's ``out_conv.*`` entries of ``state``, whatever prefix they sit under.

    Accepts keys ``out_conv.*``, ``wavelet.out_conv.*``, ``salience.out_conv.*`` (the
    authors' end-to-end checkpoints), ``salience.head.out_conv.*`` (ours), possibly
    behind ``module.`` (DDP).
    """
    groups: dict[str, dict] = {}
    for key, val in state.items():
        m = _HEAD_KEY.match(key)
        if m:
            groups.setdefault(m.group(1), {})[f"out_conv.{m.group(2)}.{m.group(3)}"] = val
    complete = {p: g for p, g in groups.items() if len(g) == 6}
    if not complete:
        raise ValueError(f"{source}: no salience head (keys out_conv.0/2/4.weight|bias) found")
    if len(complete) > 1:
        preferred = ["", "wavelet.", "salience.", "salience.head.", "head.", "module.salience.head."]
        for p in preferred:
            if p in complete:
                return complete[p]
        raise ValueError(f"{source}: several salience heads found (prefixes {sorted(complete)})")
    return next(iter(complete.values()))


def load_head(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SalienceHead:
    """A :class:`SalienceHead` (eval mode) from our head checkpoint, a model checkpoint or a state dict."""
    path = Path(path)
    obj = load_torch_file(path, "head weights file", map_location)
    if isinstance(obj, dict) and obj.get("generator") not in (None, "bank"):
        raise ValueError(f"{path}: checkpoint is for generator {obj.get('generator')!r}, not a bank head")
    head = SalienceHead()
    head.load_state_dict(head_state_from(_unwrap_state(obj, path), str(path)), strict=True)
    return head.eval()


# ----------------------------------------------------------------------------- seed fpn
class WaveletBlock(nn.Module):
    """One block of the seed's fpn (section 1b): (N, 1, H, W) -> (N, 1, H, W)."""

    def __init__(self, sigma: float, lam: float, k: int, dilation: int, padding: int) -> None:
        super().__init__()
        self.bias1 = nn.Conv2d(1, 6, 1, bias=True)
        nn.init.ones_(self.bias1.weight)
        self.bias2 = nn.Conv2d(6, 12, 1, groups=6, bias=True)
        self.wavelet_conv_odd = nn.Conv2d(12, 12, k, dilation=dilation, padding=padding, bias=False)
        self.wavelet_conv_even = nn.Conv2d(12, 12, k, dilation=dilation, padding=padding, bias=False)
        with torch.no_grad():
            self.wavelet_conv_odd.weight.copy_(fpn_kernels(k, sigma, lam, "odd"))
            self.wavelet_conv_even.weight.copy_(fpn_kernels(k, sigma, lam, "even"))
        self.wavelet_conv_odd.weight.requires_grad_(False)
        self.wavelet_conv_even.weight.requires_grad_(False)
        self.last_conv_odd = nn.Conv2d(12, 1, 1, bias=False)
        self.last_conv_even = nn.Conv2d(12, 1, 1, bias=False)
        self.last_conv = nn.Conv2d(2, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        t = self.bias2(self.bias1(x))
        odd = self.last_conv_odd(self.wavelet_conv_odd(t))
        even = self.last_conv_even(self.wavelet_conv_even(t))
        return self.last_conv(torch.cat([odd, even], dim=1))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SeedFPN(nn.Module):
    """The seed's released generator (section 1b): standardised plane (N, 1, H, W) -> map (N, 1, H, W) >= 0."""

    def __init__(self) -> None:
        super().__init__()
        for i, params in enumerate(FPN_BLOCKS, start=1):
            setattr(self, f"wavelet_{i}", nn.Sequential(WaveletBlock(*params)))
        self.up_conv = nn.Sequential(*_conv_bn_relu(9, 4), *_conv_bn_relu(4, 4), *_conv_bn_relu(4, 1))

    def blocks(self) -> list[nn.Module]:
        return [getattr(self, f"wavelet_{i}") for i in range(1, len(FPN_BLOCKS) + 1)]

    def forward(self, x: Tensor, return_logit: bool = False) -> Tensor:
        """``return_logit``: the last BatchNorm's output before the ReLU (used to fit with BCE)."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"SeedFPN expects (N, 1, H, W), got {tuple(x.shape)}")
        y = torch.cat([b(x) for b in self.blocks()], dim=1)
        layers = list(self.up_conv)
        for layer in layers[:-1]:
            y = layer(y)
        return y if return_logit else layers[-1](y)


def load_fpn(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SeedFPN:
    """A :class:`SeedFPN` (eval mode) from the authors' state dict or our fpn checkpoint, ``strict=True``."""
    path = Path(path)
    obj = load_torch_file(path, "fpn weights file", map_location)
    if isinstance(obj, dict) and obj.get("generator") not in (None, "fpn"):
        raise ValueError(f"{path}: checkpoint is for generator {obj.get('generator')!r}, not fpn")
    state = _unwrap_state(obj, path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    net = SeedFPN()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ValueError(f"{path}: not the seed fpn's weights ({first})") from None
    return net.eval()


# ----------------------------------------------------------------------------- folding
@torch.no_grad()
def _affine_kernel(fn, radius: int, out_channels: int) -> tuple[Tensor, Tensor]:
    """Kernel (C, 1, 2r+1, 2r+1) and bias (C,) of an affine map ``fn``: (1, 1, n, n) -> (1, C, n, n).

    Read off impulse responses in float64 at the centre of a canvas wide enough that
    the map's zero padding does not reach the centre: y[p] = sum_s K[s] x[p + s] + b,
    so for x = delta at q, K[s] = y[q - s] - b.
    """
    n = 8 * radius + 9
    q = n // 2
    zero = torch.zeros(1, 1, n, n, dtype=torch.float64)
    base = fn(zero)[0, :, q, q].clone()
    delta = zero.clone()
    delta[0, 0, q, q] = 1.0
    resp = fn(delta)[0, :, q - radius : q + radius + 1, q - radius : q + radius + 1] - base[:, None, None]
    if resp.shape[0] != out_channels:
        raise ValueError(f"affine map gave {resp.shape[0]} channels, expected {out_channels}")
    return resp.flip(-1, -2).unsqueeze(1).contiguous(), base


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Conv followed by eval-mode BatchNorm as one conv: weight, bias (float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double() * scale[:, None, None, None]
    b = (conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
    return w, b


def _bank_tap_kernels(bank: Tensor, weight: Tensor) -> Tensor:
    """Per-tap folded kernels K (O, 3, 3, 11, 11) of ``weight`` (O, 60, 3, 3) after ``bank`` (60, 1, 11, 11).

    K[o, a, b] = sum_c weight[o, c, a, b] * bank[c]: the bank seen through one tap (a, b) of a
    3x3 convolution. Differentiable in ``weight`` (and ``bank``); computed in their dtype.
    """
    o, c = weight.shape[:2]
    kk = bank.shape[-1]
    taps = weight.permute(0, 2, 3, 1).reshape(o * 9, c) @ bank.reshape(c, kk * kk)
    return taps.view(o, 3, 3, kk, kk)


def _place_taps(taps: Tensor) -> Tensor:
    """Sum of tap kernels placed at their tap offsets: (O, p, q, k, k) -> (O, 1, k + p - 1, k + q - 1).

    Tap (a, b)'s k x k kernel lands at rows a.., columns b.., so
    ``_place_taps(_bank_tap_kernels(bank, w))`` is the single kernel of conv(conv(x, bank), w)
    away from the borders: the bank folded into the 3x3 convolution. (Zero-padded copies
    summed: ``F.fold`` does the same but its CPU backward takes ~0.7 s on these sizes.)
    """
    _, p, q, _, _ = taps.shape
    placed = [F.pad(taps[:, a, b], (b, q - 1 - b, a, p - 1 - a)) for a in range(p) for b in range(q)]
    return torch.stack(placed).sum(0).unsqueeze(1)


def fold_bank_into_conv(bank: Tensor, weight: Tensor) -> Tensor:
    """Kernel (O, 1, 13, 13) of conv(conv(x, bank, pad 5), weight, pad 1) away from the borders.

    ``bank`` (60, 1, 11, 11), ``weight`` (O, 60, 3, 3); the bias of the 3x3 convolution carries
    over unchanged (the bank has none). Exact and differentiable; used by :class:`BankGenerator`
    (float64, once) and :class:`SalienceModule` (every forward, gradients reach ``weight``).
    """
    return _place_taps(_bank_tap_kernels(bank, weight))


# ----------------------------------------------------------------------------- generators
class _Generator:
    """Common call of the offline generators.

    ``margin`` is the receptive radius; ``__call__`` takes standardised planes already
    zero-padded by ``margin`` on each side, (N, 1, H + 2m, W + 2m), and returns the raw
    map (N, 1, H, W) with valid convolutions. ``finalize`` turns the raw (3, H, W, D)
    map of a whole volume into the stored one (min-max normalised to [0, 1]).
    """

    name: str = ""
    margin: int = RECEPTIVE_RADIUS
    weights_sha256: str = ""
    normalisation: str = "volume"  # NORMALISATIONS; set by make_generator / with_normalisation
    #: rules this generator supports (``fixed`` needs a bounded output)
    normalisations: tuple[str, ...] = ("volume",)

    @classmethod
    def check_normalisation(cls, rule: str) -> None:
        """ValueError when generators of this kind do not support normalisation ``rule``."""
        if rule not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {rule!r}; valid: {', '.join(NORMALISATIONS)}")
        if rule not in cls.normalisations:
            raise ValueError(f"generator {cls.name!r} supports normalisation {', '.join(cls.normalisations)}, "
                             f"not {rule!r}")

    def with_normalisation(self, rule: str) -> "_Generator":
        """This generator with normalisation ``rule``; ValueError when it does not support it."""
        self.check_normalisation(rule)
        self.normalisation = rule
        return self

    def standardise(self, planes: Tensor) -> Tensor:
        """Planes (N, 1, H, W) as the generator's filters see them, by its normalisation rule."""
        return standardise_planes(planes) if self.normalisation == "volume" else standardise_planes_fixed(planes)

    def __call__(self, padded: Tensor) -> Tensor:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> "_Generator":
        for key, val in vars(self).items():
            if isinstance(val, Tensor):
                setattr(self, key, val.to(device))  # .to keeps the memory format
        return self

    @property
    def device(self) -> torch.device:
        for val in vars(self).values():
            if isinstance(val, Tensor):
                return val.device
        return torch.device("cpu")

    def flops_per_pixel(self) -> float:
        """Multiply-adds x 2 executed per output pixel (ignoring the margin)."""
        return 0.0

    def zero_value(self) -> Tensor:
        """The raw output where the whole receptive field is zero: (1, 1, 1, 1) on the generator's device."""
        m = self.margin
        with torch.inference_mode():
            return self(torch.zeros((1, 1, 2 * m + 1, 2 * m + 1), dtype=torch.float32, device=self.device))

    def finalize(self, raw: np.ndarray) -> np.ndarray:
        """The raw (3, H, W, D) map of a whole volume as stored: min-max over the volume (``volume``)."""
        return minmax(raw)


class BankGenerator(_Generator):
    """``bank``: fused bank + head, the bank folded into the head's first convolution.

    Layers on padded planes (N, 1, H + 14, W + 14), all valid convolutions:
    13x13 conv 1->30 (bank + first head conv), ReLU -> (N, 30, H + 2, W + 2);
    3x3 conv 30->30, ReLU -> (N, 30, H, W) (channels-last on the CPU); 1x1 conv 30->1,
    sigmoid -> (N, 1, H, W).

    On the CPU a call is cut into blocks of at most ``block_pixels`` padded pixels
    (whole planes, or row strips of one plane with a 14-row overlap): the 30-channel
    intermediates of a block stay in the last-level cache, where a whole batch of
    ``salience_2d`` (2^21 pixels: 250 MB per intermediate) streams through memory; this
    makes salience_3d about 1.6x faster at the same arithmetic. Outputs do not depend on
    the blocking (valid convolutions see the same inputs).
    """

    name = "bank"
    block_pixels: int = BANK_CPU_BLOCK_PIXELS
    normalisations = NORMALISATIONS

    def finalize(self, raw: np.ndarray) -> np.ndarray:
        """``volume``: min-max over the volume; ``fixed``: the head's sigmoid as it is, in [0, 1]."""
        if self.normalisation == "fixed":
            return np.clip(np.asarray(raw, dtype=np.float32), 0.0, 1.0)
        return minmax(raw)

    def __init__(self, head: SalienceHead, weights_sha256: str = "") -> None:
        head = head.eval()
        bank = square_wave_bank(torch.float64)
        c0, c2, c4 = head.out_conv[0], head.out_conv[2], head.out_conv[4]

        with torch.no_grad():
            w1 = fold_bank_into_conv(bank, c0.weight.double())
        self.w1, self.b1 = w1.float(), c0.bias.detach().float().clone()
        # channels-last weights: oneDNN's fastest layout for the 30->30 convolution on CPU
        cl = torch.channels_last
        self.w2 = c2.weight.detach().float().contiguous(memory_format=cl)
        self.b2 = c2.bias.detach().float().clone()
        self.w3 = c4.weight.detach().float().contiguous(memory_format=cl)
        self.b3 = c4.bias.detach().float().clone()
        self.weights_sha256 = weights_sha256
        with torch.inference_mode():
            self._zero = self._layers(torch.zeros((1, 1, 2 * self.margin + 1, 2 * self.margin + 1)))

    def __call__(self, padded: Tensor) -> Tensor:
        """(N, 1, H + 2m, W + 2m) -> (N, 1, H, W), m = 7; cache-sized, zero-cropped blocks on the CPU."""
        n, _, hp, wp = padded.shape
        if padded.device.type != "cpu":
            return self._layers(padded)
        if n * hp * wp <= self.block_pixels:
            return self._block(padded)
        two_m = 2 * self.margin
        out = padded.new_empty((n, 1, hp - two_m, wp - two_m))
        if hp * wp <= self.block_pixels:
            # equal-sized batches of whole planes, each under block_pixels
            blocks = -(-n * hp * wp // self.block_pixels)
            for sl in _chunks(n, -(-n // blocks)):
                out[sl] = self._block(padded[sl])
            return out
        # a plane larger than a block: strips of output rows, each reading 2m more input rows
        rows = max(1, self.block_pixels // wp - two_m)
        for i in range(n):
            for r0 in range(0, hp - two_m, rows):
                r1 = min(hp - two_m, r0 + rows)
                out[i : i + 1, :, r0:r1] = self._block(padded[i : i + 1, :, r0 : r1 + two_m])
        return out

    def zero_value(self) -> Tensor:
        """The output where the whole receptive field is zero: (1, 1, 1, 1) on the generator's device
        (computed once; ``to`` moves it with the weights)."""
        return self._zero

    def _block(self, padded: Tensor) -> Tensor:
        """One block, (B, 1, h + 2m, w + 2m) -> (B, 1, h, w), filtered only where it can differ
        from :meth:`zero_value`: the rectangle of outputs within m of a non-zero input.

        After the HU window air and fat are exactly 0, and ``standardise_planes`` keeps them 0,
        so on CT a large part of every plane (around the body, inside fat) has an all-zero
        receptive field; valid convolutions give the same values on the cropped rectangle.
        """
        two_m = 2 * self.margin
        b, _, hp, wp = padded.shape
        h, w = hp - two_m, wp - two_m
        nz = (padded != 0).any(dim=0)[0]  # (hp, wp)
        rows, cols = torch.nonzero(nz.any(dim=1)), torch.nonzero(nz.any(dim=0))
        if rows.numel() == 0:
            return self.zero_value().expand(b, 1, h, w).clone()
        # output i reads input rows i .. i + 2m: it is non-constant iff one of them is non-zero
        r0, r1 = max(int(rows[0]) - two_m, 0), min(int(rows[-1]), h - 1) + 1
        c0, c1 = max(int(cols[0]) - two_m, 0), min(int(cols[-1]), w - 1) + 1
        if (r1 - r0) * (c1 - c0) >= CROP_MIN_SHARE * h * w:
            return self._layers(padded)
        out = self.zero_value().expand(b, 1, h, w).clone()
        out[:, :, r0:r1, c0:c1] = self._layers(padded[:, :, r0 : r1 + two_m, c0 : c1 + two_m])
        return out

    def _layers(self, padded: Tensor) -> Tensor:
        """The three convolutions on one block: (B, 1, h + 2m, w + 2m) -> (B, 1, h, w)."""
        y = F.relu(F.conv2d(padded, self.w1, self.b1), inplace=True)
        if y.device.type == "cpu":
            y = y.contiguous(memory_format=torch.channels_last)
        y = F.relu(F.conv2d(y, self.w2, self.b2), inplace=True)
        return torch.sigmoid_(F.conv2d(y, self.w3, self.b3))

    def flops_per_pixel(self) -> float:
        """Executed per output pixel: the three convolutions' multiply-adds x 2 (blocking adds
        only the strips' 2 overlapping rows of the first layer, ignored like the margin)."""
        return 2.0 * (self.w1.numel() + self.w2.numel() + self.w3.numel())


class FPNGenerator(_Generator):
    """``fpn``: the seed's network, nine blocks + first up-conv + BatchNorm folded into one 11x11 conv."""

    name = "fpn"

    def __init__(self, net: SeedFPN, weights_sha256: str = "") -> None:
        net = net.eval()
        up = list(net.up_conv)
        blocks = net.blocks()

        def prefix(x: Tensor) -> Tensor:
            y = torch.cat([b.double()(x) for b in blocks], dim=1)
            w, b = _fold_bn(up[0], up[1])
            return F.conv2d(y, w, b, padding=1)

        try:
            w1, b1 = _affine_kernel(prefix, 5, 4)
        finally:
            net.float()
        self.w1, self.b1 = w1.float(), b1.float()
        w2, b2 = _fold_bn(up[3], up[4])
        w3, b3 = _fold_bn(up[6], up[7])
        self.w2, self.b2, self.w3, self.b3 = w2.float(), b2.float(), w3.float(), b3.float()
        self.weights_sha256 = weights_sha256

    def __call__(self, padded: Tensor) -> Tensor:
        y = F.relu(F.conv2d(padded, self.w1, self.b1), inplace=True)
        y = F.relu(F.conv2d(y, self.w2, self.b2), inplace=True)
        return F.relu(F.conv2d(y, self.w3, self.b3), inplace=True)

    def flops_per_pixel(self) -> float:
        return 2.0 * (self.w1.numel() + self.w2.numel() + self.w3.numel())


class AnalyticGenerator(_Generator):
    """``analytic``: per size, max over orientations of the bank response, rectified, mean over sizes.

    ``finalize`` divides by the volume's 99.9th percentile and clips to [0, 1].
    """

    name = "analytic"
    margin = KERNEL_SIZE // 2
    percentile = 99.9

    def __init__(self) -> None:
        self.bank = square_wave_bank()

    def __call__(self, padded: Tensor) -> Tensor:
        r = F.conv2d(padded, self.bank)
        n, _, h, w = r.shape
        r = r.view(n, len(BANK_SIZES), BANK_ORIENTATIONS, h, w).amax(dim=2).clamp_(min=0)
        return r.mean(dim=1, keepdim=True)

    def flops_per_pixel(self) -> float:
        return 2.0 * self.bank.numel()

    def finalize(self, raw: np.ndarray) -> np.ndarray:
        flat = raw.reshape(-1)
        k = int(round(self.percentile / 100 * (flat.size - 1)))
        scale = float(np.partition(flat, k)[k]) if flat.size else 0.0
        if scale <= 0:
            return np.zeros_like(raw, dtype=np.float32)
        return minmax(np.clip(raw / scale, 0.0, 1.0))


def make_generator(kind: str, weights: Optional[str | os.PathLike] = None,
                   normalisation: str = "volume") -> _Generator:
    """A generator by name; ``bank`` and ``fpn`` need a weights file, ``analytic`` none.

    ``normalisation``: ``NORMALISATIONS`` (``fixed`` for ``bank`` only); ValueError otherwise.
    """
    if kind == "analytic":
        return AnalyticGenerator().with_normalisation(normalisation)
    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; valid: {', '.join(GENERATORS)}")
    if weights is None:
        raise ValueError(f"generator {kind!r} needs a weights file")
    sha = file_sha256(weights) if Path(weights).is_file() else ""
    if kind == "bank":
        return BankGenerator(load_head(weights), sha).with_normalisation(normalisation)
    return FPNGenerator(load_fpn(weights), sha).with_normalisation(normalisation)


# ----------------------------------------------------------------------------- planes / volumes
def minmax(a: np.ndarray) -> np.ndarray:
    """Min-max normalise the whole array to [0, 1] (all zeros when constant), float32."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros_like(a)
    out = a - lo
    out *= 1.0 / (hi - lo)
    return out


def standardise_planes(planes: Tensor) -> Tensor:
    """Per plane g' = (g - mean) / std over g > 0, 0 elsewhere (population std); (N, 1, H, W).

    A plane with no positive pixel, or a zero std (below 1e-5 of the mean: float32
    rounding of a constant plane), becomes all zeros.
    """
    if planes.dim() != 4 or planes.shape[1] != 1:
        raise ValueError(f"planes must be (N, 1, H, W), got {tuple(planes.shape)}")
    x = planes.float()
    pos = x > 0
    n = pos.sum(dim=(1, 2, 3), keepdim=True).clamp_(min=1).float()
    xp = torch.where(pos, x, torch.zeros((), dtype=x.dtype, device=x.device))
    mean = xp.sum(dim=(1, 2, 3), keepdim=True) / n
    var = (torch.where(pos, x - mean, torch.zeros((), dtype=x.dtype, device=x.device)) ** 2).sum(
        dim=(1, 2, 3), keepdim=True
    ) / n
    std = var.sqrt()
    # a constant plane has std 0 up to float32 rounding of the mean; treat that as 0
    ok = std > _STD_RTOL * mean.abs()
    out = (x - mean) / torch.where(ok, std, torch.ones_like(std))
    return torch.where(pos & ok, out, torch.zeros((), dtype=x.dtype, device=x.device))


def standardise_planes_fixed(planes: Tensor) -> Tensor:
    """Every plane g' = (g - FIXED_MEAN) / FIXED_STD on g > 0, 0 elsewhere; (N, 1, H, W).

    The ``fixed`` rule: unlike :func:`standardise_planes` a pixel's value does not depend on
    the rest of its plane, so a coronal or sagittal plane gives the same values whether the
    scan stops at the liver or goes on to the pelvis.
    """
    if planes.dim() != 4 or planes.shape[1] != 1:
        raise ValueError(f"planes must be (N, 1, H, W), got {tuple(planes.shape)}")
    x = planes.float()
    return torch.where(x > 0, (x - FIXED_MEAN) / FIXED_STD, torch.zeros((), dtype=x.dtype, device=x.device))


def _chunks(n: int, per: int) -> Iterator[slice]:
    for s in range(0, n, per):
        yield slice(s, min(n, s + per))


def salience_2d(
    planes: Tensor,
    generator: _Generator,
    *,
    standardise: bool = True,
    max_batch_voxels: int = DEFAULT_MAX_BATCH_VOXELS,
    on_batch: Optional[Callable[[int], object]] = None,
) -> Tensor:
    """Raw salience of a batch of planes: (N, 1, H, W) -> (N, 1, H, W) float32, on the generator's device.

    Each plane is standardised by the generator's rule (``generator.standardise``; unless
    ``standardise=False``), zero-padded by the
    generator's margin and filtered (reference padding semantics); planes are processed
    in batches of at most ``max_batch_voxels`` pixels. The output is the generator's
    raw map, before the volume-level normalisation of :func:`salience_3d`. ``on_batch(k)`` is
    called after each batch of k planes (a progress bar's ``update``).
    """
    if planes.dim() != 4 or planes.shape[1] != 1:
        raise ValueError(f"planes must be (N, 1, H, W), got {tuple(planes.shape)}")
    n, _, h, w = planes.shape
    m = generator.margin
    per = max(1, max_batch_voxels // ((h + 2 * m) * (w + 2 * m)))
    dev = generator.device
    out = torch.empty((n, 1, h, w), dtype=torch.float32, device=dev)
    with torch.inference_mode():
        for sl in _chunks(n, per):
            x = planes[sl].to(dev, torch.float32)
            if standardise:
                x = generator.standardise(x)
            out[sl] = generator(F.pad(x, (m, m, m, m)))
            if on_batch is not None:
                on_batch(sl.stop - sl.start)
    return out


def volume_planes(volume: Tensor, plane: str) -> Tensor:
    """Planes of a (H, W, D) volume as (N, 1, rows, cols): transverse V[:, :, d] (H x W),
    coronal V[h, :, :] (W x D), sagittal V[:, w, :] (H x D)."""
    if plane == "transverse":
        return volume.permute(2, 0, 1).unsqueeze(1)
    if plane == "coronal":
        return volume.unsqueeze(1)
    if plane == "sagittal":
        return volume.permute(1, 0, 2).unsqueeze(1)
    raise ValueError(f"unknown plane {plane!r}")


def planes_to_volume(planes: Tensor, plane: str) -> Tensor:
    """Inverse of :func:`volume_planes`: (N, 1, rows, cols) -> (H, W, D)."""
    p = planes[:, 0]
    if plane == "transverse":
        return p.permute(1, 2, 0)
    if plane == "coronal":
        return p
    if plane == "sagittal":
        return p.permute(1, 0, 2)
    raise ValueError(f"unknown plane {plane!r}")


PLANES = ("transverse", "coronal", "sagittal")


def salience_3d(
    volume: np.ndarray | Tensor,
    generator: _Generator,
    *,
    device: str | torch.device = "cpu",
    max_batch_voxels: int = DEFAULT_MAX_BATCH_VOXELS,
    standardise: bool = True,
    normalise: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Three-plane salience of a volume: (H, W, D) image in [0, 1] -> (3, H, W, D) float32 in [0, 1].

    Channels (S_t, S_c, S_s) from every transverse V[:, :, d], coronal V[h, :, :] and
    sagittal V[:, w, :] plane, then the generator's volume normalisation (``generator.finalize``:
    by its ``normalisation`` rule, ``volume``: min-max over the whole array, ``analytic`` first
    dividing by its 99.9th percentile; ``fixed``: none, the bank head's sigmoid as it is).
    ``normalise=False`` returns the raw generator maps (for comparisons and benchmarks).
    ``progress``: a tqdm bar over the planes of the three directions.
    """
    vol = torch.as_tensor(np.asarray(volume, dtype=np.float32)) if not isinstance(volume, Tensor) else volume
    if vol.dim() != 3:
        raise ValueError(f"volume must be (H, W, D), got shape {tuple(vol.shape)}")
    generator.to(device)
    raw = np.empty((3,) + tuple(vol.shape), dtype=np.float32)
    with tqdm(total=sum(vol.shape), desc="salience", unit="plane", disable=not progress, leave=False) as bar:
        for i, plane in enumerate(PLANES):
            planes = volume_planes(vol, plane)
            s = salience_2d(planes, generator, standardise=standardise, max_batch_voxels=max_batch_voxels,
                            on_batch=bar.update)
            raw[i] = planes_to_volume(s, plane).cpu().numpy()
    return generator.finalize(raw) if normalise else raw


# ----------------------------------------------------------------------------- e2e
class ResidualGate(nn.Module):
    """G_i = G + G * S_i: image (B, 1, *sp) and salience (B, C, *sp) -> gated (B, C, *sp)."""

    def forward(self, image: Tensor, salience: Tensor) -> Tensor:
        if image.dim() != salience.dim() or image.shape[1] != 1 or image.shape[2:] != salience.shape[2:]:
            raise ValueError(
                f"ResidualGate needs image (B, 1, *sp) and salience (B, C, *sp), got {tuple(image.shape)} / "
                f"{tuple(salience.shape)}"
            )
        return torch.addcmul(image, image, salience)  # one pass, one allocation


#: The 13x13 kernels :class:`SalienceModule` folds from the head's first convolution, as
#: (sign, 3x3 taps summed): the whole fold; per side of the plane, minus the taps that
#: point outside it (row -1, row +1, column -1, column +1); per corner, the one tap that
#: points outside on both sides, added back.
_FOLDS: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = (
    (1, tuple((a, b) for a in range(3) for b in range(3))),
    (-1, ((0, 0), (0, 1), (0, 2))),
    (-1, ((2, 0), (2, 1), (2, 2))),
    (-1, ((0, 0), (1, 0), (2, 0))),
    (-1, ((0, 2), (1, 2), (2, 2))),
    (1, ((0, 0),)),
    (1, ((0, 2),)),
    (1, ((2, 0),)),
    (1, ((2, 2),)),
)


def _fold_map(bank: Tensor) -> Tensor:
    """Linear map (60 * 9, len(_FOLDS) * 169): a 3x3 convolution's weight (O, 60, 3, 3),
    flattened, times it gives the :data:`_FOLDS` kernels of the bank folded into it.

    Built with :func:`fold_bank_into_conv` on the weight basis; its entries are bank
    values (or their negatives) and zeros, so the product is the fold itself.
    """
    c = bank.shape[0]
    eye = torch.eye(c, dtype=bank.dtype, device=bank.device)
    placed = []  # per tap t: bank channel c alone through tap t, (c, 169)
    for t in range(9):
        one_tap = torch.zeros(c, c, 9, dtype=bank.dtype, device=bank.device)
        one_tap[:, :, t] = eye
        placed.append(fold_bank_into_conv(bank, one_tap.view(c, c, 3, 3)).view(c, -1))
    select = torch.zeros(len(_FOLDS), 9, dtype=bank.dtype, device=bank.device)
    for i, (sign, taps) in enumerate(_FOLDS):
        for a, b in taps:
            select[i, 3 * a + b] = sign
    # map[(c, t), (k, u)] = select[k, t] * placed[t][c, u]
    return (torch.stack(placed, 1)[:, :, None, :] * select.T[None, :, :, None]).reshape(c * 9, -1)


@functools.lru_cache(maxsize=1)
def _default_fold_map() -> Tensor:
    """:func:`_fold_map` of the float32 bank, built once per process (a fraction of a second)."""
    return _fold_map(square_wave_bank())


_SPAN = KERNEL_SIZE + 2  # 13: the bank folded into a 3x3 convolution
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row side, column side): top/bottom, left/right


def _split_folds(kers: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The :data:`_FOLDS` kernels (O, 9, 13, 13) as convolution weights.

    full (O, 13, 1, 13): kernel row r -> input channel r of the row-shifted copies;
    tb, lr (2 O, 13, 1, 13): two groups (top, bottom / left, right) of the side corrections;
    corners (O, 2, 2, 13, 13): (row side, column side). All views or small copies of ``kers``.
    """
    o = kers.shape[0]
    full, tb, lr, corners = kers.split((1, 2, 2, 4), dim=1)
    return (
        full.transpose(1, 2),
        tb.transpose(0, 1).reshape(2 * o, _SPAN, 1, _SPAN),
        lr.transpose(0, 1).reshape(2 * o, _SPAN, 1, _SPAN),
        corners.reshape(o, 2, 2, _SPAN, _SPAN),
    )


def _padded(x: Tensor) -> Tensor:
    """Planes (N, 1, h, w) zero-padded by the folded kernel's radius 6: (N, h + 12, w + 12)."""
    m = _SPAN // 2
    return F.pad(x[:, 0], (m, m, m, m))


def _row_shifts(xp: Tensor, layout: torch.memory_format) -> Tensor:
    """rows[n, r, i, j] = xp[n, i + r, j]: the 13 row-shifted copies (N, 13, h, w + 12) of
    padded planes ``xp`` (N, h + 12, w + 12), in memory ``layout``."""
    return xp.unfold(1, _SPAN, 1).permute(0, 3, 1, 2).contiguous(memory_format=layout)


def _ring_inputs(xp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What the outer-ring corrections convolve, from padded planes ``xp`` (N, h + 12, w + 12).

    tb_in (N, 26, 1, w + 12): the 13 padded rows around row 0, then around row h - 1;
    lr_in (N, 26, h, 13): the 13-wide windows around column 0, then around column w - 1,
    as row-shifted copies; patches (N, 2, 13, 2, 13) [column side, r, row side, v]: the
    13x13 windows around the four corners.
    """
    n, hp, wp = xp.shape
    h, w = hp - 2 * (_SPAN // 2), wp - 2 * (_SPAN // 2)
    tb_in = torch.stack([xp[:, :_SPAN], xp[:, h - 1 :]], dim=1).view(n, 2 * _SPAN, 1, wp)
    cols = [xp[:, :, :_SPAN], xp[:, :, w - 1 :]]  # (N, h + 12, 13) each
    lr_in = torch.cat([c.unfold(1, _SPAN, 1).permute(0, 3, 1, 2) for c in cols], dim=1)
    patches = lr_in[:, :, [0, h - 1]].view(n, 2, _SPAN, 2, _SPAN)
    return tb_in, lr_in, patches


def _ring_terms(ring: tuple[Tensor, Tensor, Tensor], kers: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The outer-ring corrections of the folded first layer (see :func:`_folded_first_layer`).

    ``ring`` from :func:`_ring_inputs`; returns sides_tb (N, 2 O, 1, w) for rows 0 and
    h - 1, sides_lr (N, 2 O, h, 1) for columns 0 and w - 1, corners (4, N, O) for
    (0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1).
    """
    tb_in, lr_in, patches = ring
    _, tb, lr, corners = _split_folds(kers)
    corner = torch.einsum("njriv,oijrv->ijno", patches, corners).reshape(4, patches.shape[0], kers.shape[0])
    return F.conv2d(tb_in, tb, groups=2), F.conv2d(lr_in, lr, groups=2), corner


def _add_ring(y: Tensor, terms: tuple[Tensor, Tensor, Tensor]) -> None:
    """In place: y (N, O, h, w) plus the ring corrections ``terms`` of :func:`_ring_terms`."""
    sides_tb, sides_lr, corner = terms
    o = y.shape[1]
    h, w = y.shape[-2:]
    y[:, :, :1] += sides_tb[:, :o]
    y[:, :, h - 1 :] += sides_tb[:, o:]
    y[:, :, :, :1] += sides_lr[:, :o]
    y[:, :, :, w - 1 :] += sides_lr[:, o:]
    for i, (a, b) in enumerate(_CORNERS):
        y[:, :, a * (h - 1), b * (w - 1)] += corner[i]


def _folded_first_layer(x: Tensor, kers: Tensor, bias: Optional[Tensor], layout: torch.memory_format) -> Tensor:
    """conv(conv(x, bank, pad 5), weight, bias, pad 1), exactly, with the bank folded, before the ReLU.

    ``x`` (N, 1, h, w); ``kers`` (O, 9, 13, 13) the :data:`_FOLDS` kernels of ``weight``
    (``weight.reshape(O, -1) @ fold_map``), in ``x``'s dtype; returns y (N, O, h, w) in
    memory ``layout`` (``torch.contiguous_format`` or ``torch.channels_last``).
    Autograd-capable (the in-place ring updates touch a fresh convolution output);
    :class:`_FoldedHead` runs the same steps in chunks.

    The bank folded into the 3x3 convolution is one 13x13 kernel, right for every pixel
    whose 3x3 neighbourhood lies inside the plane. It runs as a 13-channel 1x13
    convolution of the zero-padded plane's 13 row-shifted copies (:func:`_row_shifts`;
    on the 2-core test machine 1.5x faster than a 1-channel 13x13 convolution, its weight
    gradient 5-6x).

    On the outer ring the layer-by-layer computation sees zeros where the bank's response
    lies outside the plane (the 3x3 convolution's own zero padding), while the folded
    kernel sees the response there; the ring is corrected exactly (:func:`_ring_terms`):
    per side, the folded kernel of the taps that point outside is subtracted (one grouped
    convolution for the top and bottom rows, one for the left and right columns), and at
    each corner the one tap counted by both of its sides is added back.
    """
    xp = _padded(x)
    y = F.conv2d(_row_shifts(xp, layout), _split_folds(kers)[0], bias)
    _add_ring(y, _ring_terms(_ring_inputs(xp), kers))
    return y.contiguous(memory_format=layout)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would convolve ``x`` in: its dtype, or autocast's (not for float64)."""
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _plane_chunks(n: int, h: int, w: int, device: torch.device) -> list[slice]:
    """Slices of a stack of ``n`` planes (h x w) that :class:`_FoldedHead` processes at a time.

    On the CPU about :data:`E2E_CPU_BLOCK_PIXELS` pixels (whole planes): the backward's
    temporaries are then reused from one chunk to the next instead of freshly allocated
    (every fresh page costs a fault; at 96^3, 3 planes, 1 thread, the faults of one
    whole-batch step took 1 s), while the chunks stay few: with 2 threads on a loaded
    machine, 2^16-pixel chunks (41 at 96^3, each a dozen parallel regions) made a step
    1.7x slower than 2^18 (11), the threads waiting at each region's barrier. Elsewhere
    one chunk.
    """
    if device.type != "cpu":
        return [slice(0, n)]
    per = max(1, E2E_CPU_BLOCK_PIXELS // (h * w))
    return list(_chunks(n, per))


def _plane_layout(device: torch.device) -> torch.memory_format:
    """Memory layout of :class:`_FoldedHead`'s maps: :data:`E2E_CPU_LAYOUT` on the CPU,
    channels-last elsewhere (tensor cores' native layout)."""
    return E2E_CPU_LAYOUT if device.type == "cpu" else torch.channels_last


def _mix_channels(r2: Tensor, w3: Tensor, out: Tensor, layout: torch.memory_format) -> None:
    """out (n, h, w) = sum_o w3[o] r2[:, o]: the 1x1 convolution of r2 (n, O, h, w) in ``layout``."""
    n, o = r2.shape[:2]
    if layout == torch.channels_last:
        torch.mv(r2.permute(0, 2, 3, 1).reshape(-1, o), w3, out=out.view(-1))
    else:
        torch.matmul(w3, r2.view(n, o, -1), out=out.view(n, -1))


def _channel_dots(r2: Tensor, gs: Tensor, layout: torch.memory_format) -> Tensor:
    """(O,) sum over planes and pixels of r2 (n, O, h, w) times gs (n, h, w): the 1x1
    convolution's weight gradient."""
    n, o = r2.shape[:2]
    if layout == torch.channels_last:
        return r2.permute(0, 2, 3, 1).reshape(-1, o).T @ gs.reshape(-1)
    # one matrix-vector product per plane: a batched product runs 3x slower on the CPU
    return torch.stack([torch.mv(r2[i].view(o, -1), gs[i].reshape(-1)) for i in range(n)]).sum(0)


class _FoldedHead(torch.autograd.Function):
    """The whole e2e salience of planes with the bank folded: (N, 1, h, w) -> (N, 1, h, w).

    Inputs: x, kers (O, 9, 13, 13) (:func:`_folded_first_layer`), b1 (O,), w2 (O, O, 3, 3),
    b2 (O,), w3 (1, O, 1, 1), b3 (1,), and ``keep`` (save what the backward needs: grad
    mode was on). Forward: first layer, ReLU, 3x3 convolution, ReLU, 1x1 convolution (a
    matrix-vector product over the channels), sigmoid; every ReLU is in place. Planes go
    through in chunks (:func:`_plane_chunks`), the 30-channel maps in
    :func:`_plane_layout`. All of it runs in one dtype (autocast's under autocast, with
    autocast itself off inside); gradients come back in each input's dtype, summed over
    the chunks in at least float32.

    The hand-written backward is the layer-by-layer chain rule, arranged so that only one
    30-channel map per chunk is allocated (the 3x3 convolution's input gradient): the
    second ReLU's mask times the sigmoid's gradient is written over the saved second
    activation, the 1x1 convolution's weight w3 is folded into the 3x3 convolution's weight
    (grad of the map = mask * g * w3[o], so the data gradient uses w2 * w3[o] and the
    weight and bias gradients are scaled by w3[o] afterwards), and the first ReLU's mask
    is applied in place to that input gradient. The 3x3 convolution's data and weight
    gradients are two calls (on the CPU one call of both is slower than the two). The
    gradient to ``x`` (only when it requires one) recomputes the first layer, which is
    linear in ``x``, under autograd.

    Because the saved activation is overwritten, a second backward through the same
    graph (``retain_graph=True``) raises instead of giving wrong gradients.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, kers: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor, keep: bool
    ) -> Tensor:
        dt = _compute_dtype(x)
        n, _, h, w = x.shape
        keep = keep and any(ctx.needs_input_grad[:7])
        chunks = _plane_chunks(n, h, w, x.device)
        layout = _plane_layout(x.device)
        saved: list[Tensor] = []
        with torch.autocast(x.device.type, enabled=False):
            xc, kc, b1c, w2c, b2c = x.to(dt), kers.to(dt), b1.to(dt), w2.to(dt), b2.to(dt)
            w3c = w3.to(dt).flatten()
            s = torch.empty((n, 1, h, w), dtype=dt, device=x.device)
            xp = _padded(xc)
            ring = _ring_inputs(xp)  # the ring corrections for all planes at once: few small calls
            terms = _ring_terms(ring, kc)
            full = _split_folds(kc)[0]
            for sl in chunks:
                rows = _row_shifts(xp[sl], layout)
                r1 = F.conv2d(rows, full, b1c)
                _add_ring(r1, tuple(t[sl] if i < 2 else t[:, sl] for i, t in enumerate(terms)))
                r1 = r1.relu_().contiguous(memory_format=layout)
                r2 = F.conv2d(r1, w2c, b2c, padding=1).relu_().contiguous(memory_format=layout)
                _mix_channels(r2, w3c, s[sl, 0], layout)
                if keep:
                    saved += [rows, r1, r2]
            s.add_(b3.to(dt)).sigmoid_()
        ctx.dtypes = (x.dtype, kers.dtype, b1.dtype, w2.dtype, b2.dtype, w3.dtype, b3.dtype)
        ctx.chunks, ctx.layout = chunks, layout
        ctx.consumed = False
        if keep:
            ctx.save_for_backward(xc, kc, w2c, w3c, s, *ring, *saved)
        return s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Optional[Tensor], ...]:
        if ctx.consumed:
            raise RuntimeError(
                "SalienceModule: a second backward through the same forward (retain_graph=True) is not "
                "supported; run the forward again"
            )
        ctx.consumed = True
        xc, kc, w2c, w3c, s, tb_in, lr_in, patches, *saved = ctx.saved_tensors
        need_x, need_k, need_b1, need_w2, need_b2, need_w3, need_b3, _ = ctx.needs_input_grad
        need_r1 = need_x or need_k or need_b1
        need_r2 = need_r1 or need_w2 or need_b2
        acc_dt = torch.promote_types(s.dtype, torch.float32)
        n, o = s.shape[0], w2c.shape[0]
        h, w = s.shape[-2:]
        sums: dict[int, Tensor] = {}  # input index -> gradient summed over the chunks

        def add(i: int, grad: Optional[Tensor]) -> None:
            if grad is not None:
                sums[i] = sums[i] + grad if i in sums else grad.to(acc_dt)

        grad_x = torch.empty_like(xc) if need_x else None
        # the first layer's output gradient on the outer ring, gathered over the chunks
        g_tb = s.new_empty((n, 2 * o, 1, w)) if need_k else None
        g_lr = s.new_empty((n, 2 * o, h, 1)) if need_k else None
        g_corner = s.new_empty((2, 2, n, o)) if need_k else None
        conv_bwd = torch.ops.aten.convolution_backward
        args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, ..., groups
        with torch.autocast(xc.device.type, enabled=False):
            w2s = w2c * w3c[:, None, None, None]
            full = _split_folds(kc)[0]
            for k, sl in enumerate(ctx.chunks):
                rows, r1, r2 = saved[3 * k : 3 * k + 3]
                gs = torch.ops.aten.sigmoid_backward(g[sl, 0].to(s.dtype), s[sl, 0])  # (n, h, w)
                if need_w3:
                    add(5, _channel_dots(r2, gs, ctx.layout))
                if need_b3:
                    add(6, gs.sum().view(1))
                if not need_r2:
                    continue
                # mask of the second ReLU (r2 >= 0, so sign is 0 or 1) times the sigmoid's gradient
                r2.sign_().mul_(gs.unsqueeze(1))  # written over r2
                if need_w2 or need_b2:
                    _, g_w2, g_b2 = conv_bwd(r2, r1, w2s, [o], *args, [False, need_w2, need_b2])
                    add(3, g_w2)
                    add(4, g_b2)
                if not need_r1:
                    continue
                g_r1 = conv_bwd(r2, r1, w2s, None, *args, [True, False, False])[0]
                g1 = torch.ops.aten.threshold_backward.grad_input(g_r1, r1, 0, grad_input=g_r1)
                if need_k or need_b1:
                    _, g_full, g_b1 = conv_bwd(
                        g1, rows, full, [o], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, need_k, need_b1]
                    )
                    add(1, g_full)
                    add(2, g_b1)
                if need_k:
                    torch.cat([g1[:, :, :1], g1[:, :, h - 1 :]], dim=1, out=g_tb[sl])
                    torch.cat([g1[..., :1], g1[..., w - 1 :]], dim=1, out=g_lr[sl])
                    for a, b in _CORNERS:
                        g_corner[a, b, sl] = g1[:, :, a * (h - 1), b * (w - 1)]
                if need_x:
                    with torch.enable_grad():
                        xd = xc[sl].detach().requires_grad_()
                        y = _folded_first_layer(xd, kc, None, ctx.layout)
                        (grad_x[sl],) = torch.autograd.grad(y, xd, g1)
            if 1 in sums:  # (not for an empty batch)
                sums[1] = _fold_kernel_grads(sums[1], (g_tb, g_lr, g_corner), kc, (tb_in, lr_in, patches))
        if 3 in sums:
            sums[3] = sums[3] * w3c[:, None, None, None]
        if 4 in sums:
            sums[4] = sums[4] * w3c
        if 5 in sums:
            sums[5] = sums[5].view(1, o, 1, 1)
        if grad_x is not None:
            sums[0] = grad_x
        grads = [sums.get(i) for i in range(7)]
        return (*_as_dtype(grads, ctx.dtypes), None)


def _as_dtype(grads: list[Optional[Tensor]], dtypes: tuple[torch.dtype, ...]) -> list[Optional[Tensor]]:
    return [None if gr is None else gr.to(dt) for gr, dt in zip(grads, dtypes)]


def _fold_kernel_grads(
    g_full: Tensor, g_ring: tuple[Tensor, Tensor, Tensor], kers: Tensor, ring: tuple[Tensor, Tensor, Tensor]
) -> Tensor:
    """Gradient (O, 9, 13, 13) of the :data:`_FOLDS` kernels ``kers``, from that of the whole
    fold (``g_full`` (O, 13, 1, 13), the 1x13 convolution's weight) and the first layer's
    output gradient on the outer ring ``g_ring`` = (top and bottom rows (N, 2 O, 1, w), left
    and right columns (N, 2 O, h, 1), corners (2, 2, N, O)); ``ring`` from :func:`_ring_inputs`."""
    o = kers.shape[0]
    g_tb, g_lr, g_corner = (t.to(kers.dtype) for t in g_ring)
    tb_in, lr_in, patches = ring
    _, tb, lr, _ = _split_folds(kers)
    conv_bwd = torch.ops.aten.convolution_backward
    g_tb = conv_bwd(g_tb, tb_in, tb, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 2, [False, True, False])[1]
    g_lr = conv_bwd(g_lr, lr_in, lr, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 2, [False, True, False])[1]
    g_corners = torch.einsum("ijno,njriv->oijrv", g_corner, patches)
    return torch.cat(
        [
            g_full.transpose(1, 2),
            g_tb.view(2, o, _SPAN, _SPAN).transpose(0, 1).to(g_full.dtype),
            g_lr.view(2, o, _SPAN, _SPAN).transpose(0, 1).to(g_full.dtype),
            g_corners.reshape(o, 4, _SPAN, _SPAN).to(g_full.dtype),
        ],
        dim=1,
    )


class SalienceModule(nn.Module):
    """The ``e2e`` salience: bank (fixed, non-persistent buffer) + trainable ``.head``.

    (B, 1, H, W) -> (B, 1, H, W), the plane itself; (B, 1, H, W, D) -> (B, 3, H, W, D),
    the transverse (H x W), coronal (W x D) and sagittal (H x D) planes of the patch.
    No per-plane standardisation; the values are those of plain zero-padded convolutions
    (bank padding 5, head padding 1), computed faster:

    - the bank and the head's first convolution are folded into one 13x13 convolution
      (:func:`fold_bank_into_conv`, refolded every forward so gradients reach the head),
      with an exact correction of the plane's outer ring (:func:`_folded_first_layer`);
    - plane stacks of equal shape (all three for a cube) go through one call per layer;
    - under autocast the convolutions run in its dtype (bf16), the fold in float32;
    - the layers after the fold are one autograd function (:class:`_FoldedHead`) with a
      hand-written backward: the ReLU masks are applied in place, the 1x1 convolution's
      weight is folded into the 3x3 convolution's, no gradient goes to the image unless
      it requires one, and one 30-channel map per chunk is allocated where autograd
      allocates four for the whole batch;
    - on the CPU the planes go through in chunks of 2^18 pixels with NCHW maps (in
      chunks oneDNN's 30-channel 3x3 convolution and its gradients are faster in NCHW
      than channels-last); on the GPU in one chunk, channels-last (tensor cores' layout).

    State-dict keys are ``head.out_conv.*`` only, so :func:`load_head` reads the head back
    from a model checkpoint.
    """

    def __init__(self, head: Optional[SalienceHead] = None) -> None:
        super().__init__()
        self.register_buffer("bank", square_wave_bank(), persistent=False)
        # the bank folded into any 3x3 head weight, as one linear map (see _fold_map)
        self.register_buffer("fold_map", _default_fold_map().clone(), persistent=False)
        self.head = head if head is not None else SalienceHead()

    @classmethod
    def from_head_file(cls, path: str | os.PathLike) -> "SalienceModule":
        return cls(load_head(path).train())

    def planes(self, x: Tensor) -> Tensor:
        """(N, 1, h, w) -> (N, 1, h, w) salience of independent planes."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"planes must be (N, 1, h, w), got {tuple(x.shape)}")
        conv1, _, conv2, _, conv3, _ = self.head.out_conv
        with torch.autocast(x.device.type, enabled=False):  # the fold in the weight's dtype
            weight = conv1.weight
            o = weight.shape[0]
            kers = (weight.reshape(o, -1) @ self.fold_map.to(weight.dtype)).view(o, len(_FOLDS), _SPAN, _SPAN)
        keep = torch.is_grad_enabled()
        return _FoldedHead.apply(x, kers, conv1.bias, conv2.weight, conv2.bias, conv3.weight, conv3.bias, keep)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.shape[1] == 1:
            return self.planes(x)
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"SalienceModule expects (B, 1, H, W) or (B, 1, H, W, D), got {tuple(x.shape)}")
        v = x[:, 0]
        # plane stacks (B, planes, rows, cols): transverse (B, D, H, W), coronal (B, H, W, D),
        # sagittal (B, W, H, D); stacks of equal shape share every convolution call
        stacks = (v.permute(0, 3, 1, 2), v, v.permute(0, 2, 1, 3))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, st in enumerate(stacks):
            groups.setdefault(tuple(st.shape), []).append(i)
        out: list[Optional[Tensor]] = [None, None, None]
        for shape, members in groups.items():
            batch = torch.stack([stacks[i] for i in members]).reshape(-1, 1, *shape[2:])
            # unbind, not indexing: its backward stacks the pieces instead of scattering each
            # into a zero-filled copy of the whole batch
            for i, r in zip(members, self.planes(batch).view(len(members), *shape).unbind(0)):
                out[i] = r
        t, c, s = out
        return torch.stack([t.permute(0, 2, 3, 1), c, s.permute(0, 2, 1, 3)], dim=1)


def default_head_path() -> Path:
    """The shipped bank head fitted on phantom training patients."""
    return Path(__file__).resolve().parents[1] / "pretrained" / "bank_head_phantom.pth"


__all__: Sequence[str] = (
    "square_wave_bank",
    "oriented_kernel",
    "fpn_kernels",
    "SalienceHead",
    "load_head",
    "SeedFPN",
    "load_fpn",
    "BankGenerator",
    "FPNGenerator",
    "AnalyticGenerator",
    "make_generator",
    "standardise_planes",
    "standardise_planes_fixed",
    "salience_2d",
    "salience_3d",
    "ResidualGate",
    "SalienceModule",
    "default_head_path",
)
