"""Thicker slices from thin ones: the slab averaging and the interpolation back.

Used by ``bench/thick_slices.py`` (what a model loses on thick scans) and
``scripts/thick_copies.py`` (thick copies of training cases). Arrays are (H, W, D) =
(rows, columns, slices), as everywhere in the project.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from utils.h5io import Volume


def group_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over groups of ``factor`` consecutive slices along the last axis, as float32.

    (..., D) -> (..., D // factor); trailing slices that do not fill a group are dropped.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    d = a.shape[-1] // factor * factor
    if d == 0:
        raise ValueError(f"{a.shape[-1]} slices cannot make one group of {factor}")
    return a[..., :d].reshape(a.shape[:-1] + (d // factor, factor)).astype(np.float32).mean(-1)


def thicken(vol: Volume, factor: int) -> Volume:
    """The volume with ``factor`` times thicker slices: image averaged over each group of slices,
    label and liver kept where at least half of the group is labelled. (H, W, D) -> (H, W, D // factor)."""
    def mask(m: np.ndarray) -> np.ndarray:
        return (group_mean(m > 0, factor) >= 0.5).astype(np.uint8)

    return dataclasses.replace(
        vol, image=group_mean(vol.image, factor), label=mask(vol.label),
        liver=None if vol.liver is None else mask(vol.liver),
        spacing=(vol.spacing[0], vol.spacing[1], vol.spacing[2] * factor), crop=None)


def interpolate_slices(image: np.ndarray, factor: int) -> np.ndarray:
    """Linear interpolation of a thick (H, W, d) volume to (H, W, d * factor) thin slices.

    Thin slice k of group j lies at z = j + (k + 0.5) / factor - 0.5 in thick-slice units
    (the thick slice is the mean of its group, centred on it); z is clamped to the first and
    last slice. ``group_mean(interpolate_slices(x, f), f)`` returns ``x`` for a constant
    volume, and for one linear in z everywhere but the first and last group.
    """
    d = image.shape[2]
    z = np.clip((np.arange(d * factor) + 0.5) / factor - 0.5, 0.0, d - 1.0)
    z0 = np.floor(z).astype(int)
    z1 = np.minimum(z0 + 1, d - 1)
    w = (z - z0).astype(np.float32)
    return image[:, :, z0] * (1 - w) + image[:, :, z1] * w
