"""Training augmentations and the 2-D resampling geometry shared by training and inference.

Arrays: image (*spatial) in [0, 1], label (*spatial) in [0, 1], salience (3, *spatial) or
None; spatial is (H, W) for a slice and (H, W, D) for a patch. Randomness comes from a
``numpy.random.Generator`` the dataset derives from (seed, epoch, index), so runs are
reproducible whatever the number of loader workers.

- ``rot_flip`` (the seed's ``random_rot_flip``): rot90 by k in {0..3} in the H-W plane,
  then a flip along H or W. A quarter turn swaps rows and columns, so it is only used
  when h == w (a non-square patch keeps its shape: odd k becomes k - 1, a half turn).
  It also makes the coronal (W x D) and sagittal (H x D) planes trade places: the
  salience channels 1 and 2 are swapped with it to keep the order (transverse, coronal,
  sagittal), for slices as for patches (the seed rotated the channels without swapping).
- ``intensity_jitter``: image * U(0.9, 1.1) + U(-0.05, 0.05), clipped to [0, 1] (optional).
- ``intensity_domain``: the sim-to-real randomisation (optional, ``--domain_aug``): contrast
  scaled about the tissue median by a log-uniform factor in [0.5, 1.5], shifted by up to
  +-0.06 (24 HU), and half the time white noise of std U(0, 0.02) (up to 8 HU) added; pixels
  at 0 (air, fat, padding: below the HU window) stay 0.
- ``rotate_planes``: (optional, ``--rotate_aug R``, 2-D) an in-plane rotation of image,
  salience and label by U(-R, R) degrees, bilinear, zero outside the plane (as the padding).
  Unlike ``rot_flip`` it keeps the patient's left and right, which a liver model needs. The
  coronal and sagittal salience channels are rotated as images: for small angles an
  approximation of the maps of the rotated volume.
- ``elastic_field`` / ``elastic_planes``: (optional, ``--elastic_aug E``, 2-D with a target spacing)
  a smooth random bend of image, salience and label: white noise per axis smoothed by a Gaussian
  of ``ELASTIC_SMOOTH_MM`` (dataloaders.inputs), scaled so that its largest row or column
  displacement is U(0, E) mm (a pixel may move up to about 1.3 E), sampled bilinearly, zero
  outside. A liver model trained on one or two patients sees their organs in other shapes.
- ``smooth_field`` / ``shade_planes``: (optional, ``--bias_aug B``, 2-D with a target spacing) a
  smooth random shading added to the image and its context slices (not the salience): white
  noise smoothed by a Gaussian of ``BIAS_SMOOTH_MM`` (dataloaders.inputs), scaled so that its
  largest absolute value is U(0, B) HU; pixels at 0 stay 0. Real livers are not evenly
  enhanced (perfusion, fat, lesions).
- ``gaussian_blur``: (optional, ``--blur_aug S``) half the time, an in-plane Gaussian blur of
  the image with sigma U(0.3, S) pixels of the grid the model sees (H and W only; a patch's
  D axis is left alone). Salience and label are not blurred.

One geometry for every 2-D plane (image, salience, label and, at inference, the
probability mapped back): :func:`resize_planes`, bilinear with ``align_corners=False``
(pixel centres at (i + 0.5) * scale) and antialiasing when shrinking (a triangle filter as
wide as the scale, so a one-pixel vessel is averaged, not skipped). The label is resized
as a float like the image and kept as a soft target in [0, 1]: its centroid moves with
the image's and a thin vessel keeps its mass instead of vanishing under ``nearest``.
Predictions are resized back the same way and then thresholded (inference.binarize).

- ``spacing_size``: the (H', W') that puts a plane of spacing (row, col) mm at
  ``target_spacing`` mm per pixel.
- ``pad_or_crop``: to a fixed size; padding is centred (before = diff // 2, as MONAI's
  sliding window pads), a crop is at a random offset (training) or centred.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dataloaders.inputs import BLUR_MIN_SIGMA

Arrays = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]


def rot_flip(image: np.ndarray, label: np.ndarray, salience: Optional[np.ndarray],
             rng: np.random.Generator) -> Arrays:
    """Seed's random rot90 + flip in the H-W plane (2-D slices and 3-D patches); shapes are kept.
    ``label`` is shaped like ``image`` or has a leading class axis (K, ...)."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    if image.shape[0] != image.shape[1]:
        k -= k % 2  # a quarter turn would swap h and w of a non-square patch
    image = np.flip(np.rot90(image, k, axes=(0, 1)), axis=axis)
    lead = label.ndim - image.ndim  # 1 with a class axis
    label = np.flip(np.rot90(label, k, axes=(lead, lead + 1)), axis=axis + lead)
    if salience is not None:
        salience = np.flip(np.rot90(salience, k, axes=(1, 2)), axis=axis + 1)
        if k % 2 == 1:
            salience = salience[[0, 2, 1]]
    return (np.ascontiguousarray(image), np.ascontiguousarray(label),
            None if salience is None else np.ascontiguousarray(salience))


def intensity_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (*spatial, in [0, 1]) scaled by U(0.9, 1.1) and shifted by U(-0.05, 0.05) (of the
    HU window's width: 20 HU), clipped back to [0, 1]; float32, same shape."""
    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.05, 0.05)
    return np.clip(image * scale + shift, 0.0, 1.0).astype(np.float32)


DOMAIN_SCALE = (0.5, 1.5)
DOMAIN_SHIFT = 0.06
DOMAIN_NOISE = 0.02


def intensity_domain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Randomise contrast, level and noise of ``image`` (*spatial, in [0, 1]); float32, same shape.

    Why: a model trained on phantoms tied vessels to the phantoms' absolute intensities
    (real 3D-IRCADb patient 1 with its contrast scaled x1.3 about the liver lost a quarter of
    its sensitivity); real scans differ in enhancement, level and noise from patient to patient.
    """
    image = np.asarray(image, dtype=np.float32)
    body = image > 0
    if not body.any():
        return image.copy()
    centre = float(np.median(image[body]))
    scale = float(np.exp(rng.uniform(np.log(DOMAIN_SCALE[0]), np.log(DOMAIN_SCALE[1]))))
    out = centre + scale * (image - centre) + np.float32(rng.uniform(-DOMAIN_SHIFT, DOMAIN_SHIFT))
    if rng.random() < 0.5:
        out += rng.normal(0.0, rng.uniform(0.0, DOMAIN_NOISE), image.shape).astype(np.float32)
    return np.where(body, np.clip(out, 0.0, 1.0), 0.0).astype(np.float32)


BLUR_PROB = 0.5


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, max_sigma: float) -> np.ndarray:
    """With probability 1/2, blur ``image`` (H, W) or (H, W, D) in-plane; float32, same shape.

    sigma ~ U(0.3, ``max_sigma``) pixels on H and W, 0 on D (``scipy.ndimage.gaussian_filter``,
    borders reflected). Why: scanners and reconstruction kernels differ in sharpness, and a
    real vessel's edge is softer than a phantom's (a 3D-IRCADb label's outer voxel layer has
    about 0.4 of its core's contrast, a phantom's 0.8; ``bench/phantom_stats.py``), so the
    model sees the same label under several point-spread functions. Draws nothing from ``rng``
    when ``max_sigma`` is 0.
    """
    from scipy.ndimage import gaussian_filter  # scipy is slow to import; only blurring runs need it

    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ValueError(f"gaussian_blur needs an image (H, W) or (H, W, D), got shape {image.shape}")
    if not max_sigma or rng.random() >= BLUR_PROB:
        return image
    sigma = float(rng.uniform(BLUR_MIN_SIGMA, max_sigma))
    return gaussian_filter(image, (sigma, sigma) + (0.0,) * (image.ndim - 2)).astype(np.float32)


def rotate_planes(x: np.ndarray, label: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate planes x (C, H, W) and the label (K, H, W) by ``degrees`` (counter-clockwise in the
    (row, col) display of the plane) about the plane's centre, keeping the shape: bilinear, zero
    outside; the soft label stays in [0, 1]."""
    if x.ndim != 3 or label.ndim != 3 or x.shape[1:] != label.shape[1:]:
        raise ValueError(f"rotate_planes needs x (C, H, W) and label (K, H, W) of one plane, got "
                         f"{x.shape} / {label.shape}")
    if degrees == 0:
        return x, label
    from scipy import ndimage  # slow to import; only rotating runs need it
    return _resample_together(x, label, lambda both: ndimage.rotate(both, degrees, axes=(1, 2), reshape=False,
                                                                    order=1, mode="constant", cval=0.0))


def _resample_together(x: np.ndarray, label: np.ndarray,
                       resample: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """x (C, H, W) and label (K, H, W) through one ``resample`` of their float32 stack (C + K, H, W)
    (bilinear, zero outside, so the label stays with the image); the soft label clipped to [0, 1]."""
    n = x.shape[0]
    both = resample(np.concatenate([x, label]).astype(np.float32))
    return both[:n], np.clip(both[n:], 0.0, 1.0)


def smooth_field(shape: Sequence[int], n: int, max_abs: float, smooth_px: float,
                 rng: np.random.Generator) -> np.ndarray:
    """``n`` smooth random fields (n, H, W) over a plane of ``shape`` (H, W): white noise each,
    smoothed by a Gaussian of ``smooth_px`` pixels, all scaled by one factor so that the largest
    absolute value of any of them is ``max_abs``."""
    if len(shape) != 2 or n < 1 or max_abs < 0 or smooth_px <= 0:
        raise ValueError(f"smooth_field needs (H, W), n >= 1, max_abs >= 0 and smooth_px > 0, got {tuple(shape)}, "
                         f"{n}, {max_abs}, {smooth_px}")
    from scipy import ndimage  # slow to import; only the runs that draw fields need it
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), smooth_px, mode="reflect")
                      for _ in range(n)])
    peak = float(np.abs(field).max())
    return field * (max_abs / peak) if peak > 0 else field


def elastic_field(shape: Sequence[int], max_px: float, smooth_px: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random displacement (2, H, W) in pixels for a plane of ``shape`` (H, W): white
    noise per axis smoothed by a Gaussian of ``smooth_px``, scaled so that its largest
    component is ``max_px``."""
    if len(shape) != 2 or max_px < 0 or smooth_px <= 0:
        raise ValueError(f"elastic_field needs (H, W), max_px >= 0 and smooth_px > 0, got {tuple(shape)}, "
                         f"{max_px}, {smooth_px}")
    return smooth_field(shape, 2, max_px, smooth_px, rng)


def shade_planes(x: np.ndarray, shading: np.ndarray) -> np.ndarray:
    """Planes x (C, H, W) in [0, 1] plus ``shading`` (H, W) (units of the HU window's width) where
    they are above 0, clipped to [0, 1]; float32. Pixels at 0 (below the window: fat, air,
    padding) stay 0, so the shading does not draw tissue where there is none."""
    if x.ndim != 3 or shading.shape != x.shape[1:]:
        raise ValueError(f"shade_planes needs x (C, H, W) and shading (H, W) of one plane, got {x.shape} / "
                         f"{shading.shape}")
    return np.where(x > 0, np.clip(x + shading[None], 0.0, 1.0), 0.0).astype(np.float32)


def elastic_planes(x: np.ndarray, label: np.ndarray, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warp planes x (C, H, W) and the label (K, H, W) by ``field`` (2, H, W), pixels (output
    pixel (i, j) samples the input at (i + field[0, i, j], j + field[1, i, j])): bilinear,
    zero outside; the soft label stays in [0, 1]."""
    if x.ndim != 3 or label.ndim != 3 or x.shape[1:] != label.shape[1:] or field.shape != (2,) + x.shape[1:]:
        raise ValueError(f"elastic_planes needs x (C, H, W), label (K, H, W) and field (2, H, W) of one plane, got "
                         f"{x.shape} / {label.shape} / {field.shape}")
    from scipy import ndimage
    rows, cols = np.meshgrid(np.arange(x.shape[1]), np.arange(x.shape[2]), indexing="ij")
    coords = np.stack([rows + field[0], cols + field[1]])
    return _resample_together(x, label, lambda both: np.stack([
        ndimage.map_coordinates(c, coords, order=1, mode="constant", cval=0.0) for c in both]))


def _size2(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size must be two positive integers (H, W), got {tuple(size)}")
    return int(size[0]), int(size[1])


def resize_planes(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize planes (N, C, H, W) to (N, C, H', W'), float32, the project's one 2-D geometry.

    Bilinear, ``align_corners=False``, antialiased where it shrinks; computed in fp32 with
    autocast off (so probabilities stay fp32 under AMP). Returns ``x`` itself (as float32)
    when the size already matches.
    """
    if x.ndim != 4:
        raise ValueError(f"resize_planes needs (N, C, H, W), got shape {tuple(x.shape)}")
    size = _size2(size)
    x = x.float()
    if tuple(x.shape[-2:]) == size:
        return x
    with torch.autocast(x.device.type, enabled=False):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_2d(x: np.ndarray, label: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize planes x (C, H, W) and the label (H, W), or one channel per class (K, H, W), to
    ``size`` with one geometry.

    Returns (x float32 (C, H', W'), label float32 (H', W') or (K, H', W') soft in [0, 1]);
    no-op (label as float32) if the size already matches.
    """
    lab = np.asarray(label, dtype=np.float32)
    lab = lab[None] if lab.ndim == 2 else lab
    if x.ndim != 3 or lab.ndim != 3 or x.shape[1:] != lab.shape[1:]:
        raise ValueError(f"resize_2d needs x (C, H, W) and label (H, W) or (K, H, W) of one plane, got "
                         f"{x.shape} / {label.shape}")
    n = x.shape[0]
    both = np.concatenate([np.asarray(x, dtype=np.float32), lab])
    out = resize_planes(torch.from_numpy(both)[None], size)[0].numpy()
    out_lab = np.clip(out[n:], 0.0, 1.0)
    return out[:n], (out_lab[0] if label.ndim == 2 else out_lab)


def spacing_size(shape: Sequence[int], spacing: Sequence[float], target_spacing: float) -> tuple[int, int]:
    """(H', W') = round(H * row_mm / t), round(W * col_mm / t): the plane at ``t`` mm per pixel."""
    if target_spacing is None or not target_spacing > 0:
        raise ValueError(f"target spacing must be a positive number of mm, got {target_spacing}")
    if len(spacing) < 2 or min(float(s) for s in spacing[:2]) <= 0:
        raise ValueError(f"in-plane spacing must be two positive numbers (mm), got {tuple(spacing)}")
    return (max(1, int(round(shape[0] * float(spacing[0]) / target_spacing))),
            max(1, int(round(shape[1] * float(spacing[1]) / target_spacing))))


def pad_or_crop(x: np.ndarray, size: Sequence[int], rng: Optional[np.random.Generator] = None,
                start: Optional[Sequence[int]] = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Planes (C, H, W) to (C, *size): zero-pad centred, crop at ``start``, a random offset
    (``rng``) or the centre. Returns (array, crop start (row, col); 0 where padded)."""
    size = _size2(size)
    if x.ndim != 3:
        raise ValueError(f"pad_or_crop needs (C, H, W), got shape {x.shape}")
    if start is None:
        start = [int(rng.integers(0, n - s + 1)) if (rng is not None and n > s) else max(0, (n - s) // 2)
                 for n, s in zip(x.shape[1:], size)]
    out = x[:, start[0]:start[0] + size[0], start[1]:start[1] + size[1]]
    pad = [(0, 0)] + [((s - n) // 2, s - n - (s - n) // 2) for n, s in zip(out.shape[1:], size)]
    if any(a or b for a, b in pad):
        out = np.pad(out, pad)
    return np.ascontiguousarray(out), (int(start[0]), int(start[1]))
