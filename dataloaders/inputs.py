"""How the network input is built from image and salience, for every ``--salience`` mode.

One function for training datasets, validation and test.py, so they cannot disagree.

- ``none``:    1 channel, the image G.
- ``offline``: 3 channels, the residual gate G + G * S_i for i in (transverse, coronal,
  sagittal) (docs/DESIGN.md section 1, step 4), from a stored salience map.
- ``e2e``:     1 channel, the image G; the salience module inside the model gates it.

With ``context`` K > 0 (``main.py --context_slices K``, 2-D backbones, ``none`` and ``offline``),
the 2K neighbouring transverse slices' images follow the mode's channels, in the order
z-K, ..., z-1, z+1, ..., z+K, each index clamped to the volume (the first and last slices
repeat at its ends): in one slice a vessel, the IVC or a bowel loop can look alike, above and
below they do not.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

SALIENCE_MODES = ("none", "offline", "e2e")


def check_context(context: int, mode: str) -> int:
    """``--context_slices`` as an int >= 0, else ValueError; e2e's salience module gates one
    image channel, so it takes no neighbours."""
    if isinstance(context, bool) or int(context) != context or context < 0:
        raise ValueError(f"--context_slices must be an integer >= 0, got {context}")
    if context and mode == "e2e":
        raise ValueError("--context_slices is for --salience none or offline: the e2e salience module gates "
                         "one image channel")
    return int(context)


def input_channels(mode: str, context: int = 0) -> int:
    """Channels the backbone wrapper receives for a salience mode and ``context`` neighbouring
    slices on each side."""
    if mode not in SALIENCE_MODES:
        raise ValueError(f"unknown salience mode {mode!r}; valid: {', '.join(SALIENCE_MODES)}")
    return (3 if mode == "offline" else 1) + 2 * check_context(context, mode)


def context_indices(z: int, depth: int, context: int) -> list[int]:
    """The slice indices of the 2K neighbours (K = ``context``) of slice ``z`` in a volume of
    ``depth`` slices: z-K, ..., z-1, z+1, ..., z+K, clamped to [0, depth - 1]."""
    if not 0 <= z < depth:
        raise ValueError(f"slice {z} is outside a volume of {depth} slices")
    return [min(max(z + dz, 0), depth - 1) for dz in range(-context, context + 1) if dz]


def model_input(image: np.ndarray, salience: Optional[np.ndarray], mode: str,
                neighbours: Optional[np.ndarray] = None) -> np.ndarray:
    """Network input (C, *spatial) for ``image`` (*spatial) and ``salience`` (3, *spatial).

    ``spatial`` is (H, W) for a slice or (H, W, D) for a volume or patch. ``neighbours``
    (2K, *spatial): the context slices' images (:func:`context_indices` order), appended.
    """
    input_channels(mode)
    image = np.asarray(image, dtype=np.float32)
    if mode != "offline":
        x = image[None]
    elif salience is None:
        raise ValueError("salience mode 'offline' needs a salience map (run salience_generation.py)")
    elif salience.shape != (3,) + image.shape:
        raise ValueError(f"salience shape {salience.shape} does not match image shape (3,) + {image.shape}")
    else:
        x = (image[None] * (1.0 + salience)).astype(np.float32)
    if neighbours is None:
        return x
    check_context(neighbours.shape[0] // 2, mode)  # e2e takes none
    if neighbours.ndim != image.ndim + 1 or neighbours.shape[1:] != image.shape or neighbours.shape[0] % 2:
        raise ValueError(f"neighbours must be (2K, *{image.shape}), got {neighbours.shape}")
    return np.concatenate([x, neighbours.astype(np.float32)])


def check_scale_aug(scale_aug: float) -> float:
    """``--scale_aug`` as a float in [0, 1) (0: off), else ValueError; torch-free, so
    ``TrainConfig`` checks it as early as the slice dataset does."""
    if not 0 <= scale_aug < 1:
        raise ValueError(f"--scale_aug must be in [0, 1), got {scale_aug}")
    return float(scale_aug)


def _in_range(flag: str, value: float, high: float, unit: str) -> float:
    value = float(value)
    if not 0 <= value <= high:
        raise ValueError(f"{flag} must be in [0, {high:g}] {unit}, got {value}")
    return value


def check_rotate_aug(max_degrees: float) -> float:
    """``--rotate_aug`` as a float in [0, 45] degrees (0: off), else ValueError; torch-free, like
    :func:`check_scale_aug`."""
    return _in_range("--rotate_aug", max_degrees, 45, "degrees")


#: the elastic bend's Gaussian smoothness (mm): organ-sized bends, not a vessel's wiggle
ELASTIC_SMOOTH_MM = 25.0
#: the largest --elastic_aug (mm): a field of this smoothness whose components reach further folds
#: the plane over itself in some draws (a Jacobian <= 0: 1 of 20 draws at 30 mm, none at 25)
ELASTIC_MAX_MM = ELASTIC_SMOOTH_MM


def check_elastic_aug(max_mm: float) -> float:
    """``--elastic_aug`` as a float in [0, ELASTIC_MAX_MM] mm (0: off), else ValueError; torch-free,
    like :func:`check_scale_aug`."""
    return _in_range("--elastic_aug", max_mm, ELASTIC_MAX_MM, "mm")


#: the --bias_aug shading's Gaussian smoothness (mm): regions of an organ, not its texture
BIAS_SMOOTH_MM = 25.0
#: the largest --bias_aug (HU): a quarter of the HU window (utils.h5io.HU_WINDOW); more would drown the
#: contrast between organs
BIAS_MAX_HU = 100.0


def check_bias_aug(max_hu: float) -> float:
    """``--bias_aug`` as a float in [0, BIAS_MAX_HU] HU (0: off), else ValueError; torch-free, like
    :func:`check_scale_aug`."""
    return _in_range("--bias_aug", max_hu, BIAS_MAX_HU, "HU")


BLUR_MIN_SIGMA = 0.3  # pixels; a blur narrower than this barely moves a one-pixel vessel


def check_blur_aug(max_sigma: float) -> float:
    """``--blur_aug`` as a float: 0 (off) or the largest sigma, in [0.3, 4] pixels, else ValueError;
    torch-free, like :func:`check_scale_aug`."""
    max_sigma = float(max_sigma)
    if max_sigma != 0 and not BLUR_MIN_SIGMA <= max_sigma <= 4:
        raise ValueError(f"--blur_aug must be 0 (off) or a sigma in [{BLUR_MIN_SIGMA}, 4] pixels, got {max_sigma}")
    return max_sigma
