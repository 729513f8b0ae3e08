"""How the network input is built from image and salience, for every ``--salience`` mode.

One function for training datasets, validation and test.py, so they cannot disagree.

- ``none``:    1 channel, the image G.
- ``offline``: 3 channels, the residual gate G + G * S_i for i in (transverse, coronal,
  sagittal) (docs/DESIGN.md section 1, step 4), from a stored salience map.
- ``e2e``:     1 channel, the image G; the salience module inside the model gates it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

SALIENCE_MODES = ("none", "offline", "e2e")


def input_channels(mode: str) -> int:
    """Channels the backbone wrapper receives for a salience mode."""
    if mode not in SALIENCE_MODES:
        raise ValueError(f"unknown salience mode {mode!r}; valid: {', '.join(SALIENCE_MODES)}")
    return 3 if mode == "offline" else 1


def model_input(image: np.ndarray, salience: Optional[np.ndarray], mode: str) -> np.ndarray:
    """Network input (C, *spatial) for ``image`` (*spatial) and ``salience`` (3, *spatial).

    ``spatial`` is (H, W) for a slice or (H, W, D) for a volume or patch.
    """
    input_channels(mode)
    image = np.asarray(image, dtype=np.float32)
    if mode != "offline":
        return image[None]
    if salience is None:
        raise ValueError("salience mode 'offline' needs a salience map (run salience_generation.py)")
    if salience.shape != (3,) + image.shape:
        raise ValueError(f"salience shape {salience.shape} does not match image shape (3,) + {image.shape}")
    return (image[None] * (1.0 + salience)).astype(np.float32)


def check_scale_aug(scale_aug: float) -> float:
    """``--scale_aug`` as a float in [0, 1) (0: off), else ValueError; torch-free, so
    ``TrainConfig`` checks it as early as the slice dataset does."""
    if not 0 <= scale_aug < 1:
        raise ValueError(f"--scale_aug must be in [0, 1), got {scale_aug}")
    return float(scale_aug)


BLUR_MIN_SIGMA = 0.3  # pixels; a blur narrower than this barely moves a one-pixel vessel


def check_blur_aug(max_sigma: float) -> float:
    """``--blur_aug`` as a float: 0 (off) or the largest sigma, in [0.3, 4] pixels, else ValueError;
    torch-free, like :func:`check_scale_aug`."""
    max_sigma = float(max_sigma)
    if max_sigma != 0 and not BLUR_MIN_SIGMA <= max_sigma <= 4:
        raise ValueError(f"--blur_aug must be 0 (off) or a sigma in [{BLUR_MIN_SIGMA}, 4] pixels, got {max_sigma}")
    return max_sigma
