"""Training augmentations and resizing.

Arrays: image (*spatial) in [0, 1], label (*spatial) {0, 1}, salience (3, *spatial) or
None; spatial is (H, W) for a slice and (H, W, D) for a patch. Randomness comes from a
``numpy.random.Generator`` the dataset derives from (seed, epoch, index), so runs are
reproducible whatever the number of loader workers.

- ``rot_flip`` (the seed's ``random_rot_flip``): rot90 by k in {0..3} in the H-W plane,
  then a flip along H or W. A quarter turn swaps rows and columns, so the coronal
  (W x D) and sagittal (H x D) planes trade places: the salience channels 1 and 2 are
  swapped with it to keep the order (transverse, coronal, sagittal), for slices as for
  patches (the seed rotated the channels without swapping them).
- ``intensity_jitter``: image * U(0.9, 1.1) + U(-0.05, 0.05), clipped to [0, 1] (optional).
- ``resize_2d``: bilinear (align_corners False) for image/salience, nearest for the label;
  the same interpolation inference.predict_volume uses, so train and test inputs agree.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Arrays = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]


def rot_flip(image: np.ndarray, label: np.ndarray, salience: Optional[np.ndarray],
             rng: np.random.Generator) -> Arrays:
    """Seed's random rot90 + flip in the H-W plane (works for 2-D slices and 3-D patches)."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    image = np.flip(np.rot90(image, k, axes=(0, 1)), axis=axis)
    label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
    if salience is not None:
        salience = np.flip(np.rot90(salience, k, axes=(1, 2)), axis=axis + 1)
        if k % 2 == 1:
            salience = salience[[0, 2, 1]]
    return (np.ascontiguousarray(image), np.ascontiguousarray(label),
            None if salience is None else np.ascontiguousarray(salience))


def intensity_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.05, 0.05)
    return np.clip(image * scale + shift, 0.0, 1.0).astype(np.float32)


def resize_2d(x: np.ndarray, label: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize an input (C, H, W) and its label (H, W) to ``size`` (H', W'); no-op if equal."""
    size = (int(size[0]), int(size[1]))
    if x.ndim != 3 or label.ndim != 2:
        raise ValueError(f"resize_2d needs x (C, H, W) and label (H, W), got {x.shape} / {label.shape}")
    if tuple(label.shape) == size:
        return x, label
    xt = F.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None], size=size, mode="bilinear",
                       align_corners=False)[0]
    lt = F.interpolate(torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None, None], size=size,
                       mode="nearest")[0, 0]
    return xt.numpy(), lt.numpy().astype(label.dtype)
