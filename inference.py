"""Whole-volume inference: one function for test.py and the trainer's validation (contract 3).

``predict_volume`` turns a model that maps network inputs to one logit channel into
probabilities over a stored volume:

- 2-D backbones see the volume slice by slice along D, in batches, each slice built by
  :func:`dataloaders.inputs.model_input` (so training, validation and test agree);
  slices are resized (bilinear) to ``img_size`` when it differs from the stored plane
  and the probabilities are resized back.
- 3-D backbones use MONAI's ``sliding_window_inference`` with Gaussian blending of the
  *probabilities* (sigmoid inside the window predictor, as nnU-Net blends softmax);
  windows run on ``sw_device`` and are stitched on ``device``, so a volume too large
  for the GPU is stitched in host memory (``device="cpu", sw_device="cuda"``);
  :func:`stitch_device` picks the GPU when the volume fits in its free memory.
- ``tta=True`` averages the probabilities over flips (2-D: none, H, W, H+W; 3-D: none,
  H, W, D), each prediction flipped back before averaging.

Thresholding (at 0.5) is the caller's job.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dataloaders.inputs import input_channels, model_input


Predictor = Callable[[torch.Tensor], torch.Tensor]


def flip_sets(spatial_dims: int, tta: bool) -> list[tuple[int, ...]]:
    """Tensor dims to flip for each test-time-augmentation pass ((B, C, *spatial) layout)."""
    if not tta:
        return [()]
    if spatial_dims == 2:
        return [(), (2,), (3,), (2, 3)]
    return [(), (2,), (3,), (4,)]


def _with_tta(predictor: Predictor, flips: Sequence[tuple[int, ...]]) -> Predictor:
    """Average ``predictor`` over flipped copies of its input, each output flipped back."""
    if len(flips) == 1 and flips[0] == ():
        return predictor

    def run(x: torch.Tensor) -> torch.Tensor:
        acc = None
        for dims in flips:
            y = predictor(torch.flip(x, dims) if dims else x)
            y = torch.flip(y, dims) if dims else y
            acc = y if acc is None else acc + y
        return acc / len(flips)

    return run


def sliding_window_volume(
    predictor: Predictor,
    x: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    sw_device: Optional[str | torch.device] = None,
) -> torch.Tensor:
    """Gaussian-blended sliding-window output of ``predictor`` over ``x``.

    x: (1, C, H, W, D) (or (1, C, H, W)); windows of ``patch_size`` are sent to
    ``sw_device`` (default ``device``), outputs stitched on ``device``. A volume smaller
    than the patch is zero-padded to it and the output cropped back (MONAI's behaviour).
    Returns (1, C_out, *spatial) on ``device``.
    """
    if x.ndim - 2 != len(patch_size):
        raise ValueError(f"patch_size {tuple(patch_size)} does not match input of shape {tuple(x.shape)}")
    from monai.inferers import sliding_window_inference  # heavy import (2 s): only where used

    return sliding_window_inference(
        x.to(device),
        roi_size=tuple(int(p) for p in patch_size),
        sw_batch_size=batch_size,
        predictor=predictor,
        overlap=overlap,
        mode="gaussian",
        sw_device=sw_device or device,
        device=device,
    )


def stitch_device(spatial_shape: Sequence[int], in_channels: int, run_device: str | torch.device,
                  memory_fraction: float = 0.5) -> torch.device:
    """Where to assemble a whole-volume prediction: ``run_device`` unless it is a GPU without room.

    The stitching buffers of a volume of ``spatial_shape`` voxels (the input's
    ``in_channels``, the output, MONAI's count map and a spare: 4 bytes each) must fit in
    ``memory_fraction`` of the GPU's free memory; otherwise the host (``cpu``) stitches.
    """
    run_device = torch.device(run_device)
    if run_device.type != "cuda":
        return run_device
    need = math.prod(int(s) for s in spatial_shape) * 4 * (int(in_channels) + 3)
    free, _ = torch.cuda.mem_get_info(run_device)
    return run_device if need <= memory_fraction * free else torch.device("cpu")


def _check_model_device(model: torch.nn.Module, device: torch.device) -> None:
    p = next(iter(model.parameters()), None)
    if p is not None and p.device.type != device.type:
        raise ValueError(f"model is on {p.device} but inference was asked to run on {device}; move it first")


def _predict_2d(
    predictor: Predictor,
    image: np.ndarray,
    salience: Optional[np.ndarray],
    salience_mode: str,
    img_size: Optional[Sequence[int]],
    batch_size: int,
    device: torch.device,
    out_device: torch.device,
) -> torch.Tensor:
    h, w, d = image.shape
    target = (h, w) if img_size is None else (int(img_size[0]), int(img_size[1]))
    resize = target != (h, w)
    out = torch.empty((d, h, w), dtype=torch.float32, device=out_device)
    for z0 in range(0, d, batch_size):
        zs = range(z0, min(z0 + batch_size, d))
        xb = np.stack([
            model_input(image[:, :, z], None if salience is None else salience[:, :, :, z], salience_mode)
            for z in zs
        ])
        x = torch.from_numpy(xb).to(device)  # (B, C, H, W)
        if resize:
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        p = predictor(x)  # (B, 1, h', w') probabilities
        if resize:
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        out[z0:z0 + len(zs)] = p[:, 0].to(out_device)
    return out.permute(1, 2, 0)  # (H, W, D)


def predict_volume(
    model: torch.nn.Module | Predictor,
    image: np.ndarray,
    salience: Optional[np.ndarray],
    *,
    salience_mode: str,
    spatial_dims: int,
    img_size: Optional[Sequence[int]] = None,
    patch_size: Optional[Sequence[int]] = None,
    overlap: float = 0.5,
    tta: bool = False,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    sw_device: Optional[str | torch.device] = None,
) -> np.ndarray:
    """Vessel probabilities float32 (H, W, D) in [0, 1] on the stored grid of ``image``.

    model: returns logits (B, 1, H, W) for input (B, C, H, W) when ``spatial_dims`` is 2,
        (B, 1, H, W, D) for (B, C, H, W, D) when 3; C = ``input_channels(salience_mode)``.
        It must already be on ``sw_device or device``; it is put in eval mode for the
        call and its previous mode restored.
    image: (H, W, D) in [0, 1]. salience: (3, H, W, D) in [0, 1], or None unless
        ``salience_mode == "offline"``.
    img_size: (H', W') the 2-D model runs at (bilinear resize both ways); None = native.
    patch_size: (h, w, d) window of a 3-D model (required for 3-D).
    overlap: window overlap fraction in [0, 1) (3-D). batch_size: slices (2-D) or windows
        (3-D) per forward pass. device: where the output is assembled; sw_device: where the
        model runs (default ``device``).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, D), got shape {image.shape}")
    if salience is not None and salience.shape != (3,) + image.shape:
        raise ValueError(f"salience must be (3, H, W, D) = {(3,) + image.shape}, got {salience.shape}")
    input_channels(salience_mode)  # validates the mode
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    out_device = torch.device(device)
    run_device = torch.device(sw_device) if sw_device is not None else out_device
    is_module = isinstance(model, torch.nn.Module)
    if is_module:
        _check_model_device(model, run_device)
        was_training = model.training
        model.eval()

    def probs(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model(x).float())

    predictor = _with_tta(probs, flip_sets(spatial_dims, tta))
    try:
        with torch.no_grad():
            if spatial_dims == 2:
                out = _predict_2d(predictor, image, salience, salience_mode, img_size, batch_size, run_device,
                                  out_device)
            else:
                if patch_size is None or len(patch_size) != 3:
                    raise ValueError(f"a 3-D model needs patch_size (h, w, d), got {patch_size}")
                x = torch.from_numpy(model_input(image, salience, salience_mode))[None]  # (1, C, H, W, D)
                out = sliding_window_volume(predictor, x, patch_size, overlap=overlap, batch_size=batch_size,
                                            device=out_device, sw_device=run_device)[0, 0]
    finally:
        if is_module:
            model.train(was_training)
    return out.cpu().numpy().astype(np.float32, copy=False)
