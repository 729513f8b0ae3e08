"""Whole-volume inference: one function for test.py and the trainer's validation (contract 3).

``predict_volume`` turns a model that maps network inputs to one logit channel into
probabilities over a stored volume:

- 2-D backbones see the volume slice by slice along D, in batches. Each slice's image and
  salience are brought to the model's grid with the geometry training uses
  (dataloaders.transforms.resize_planes: bilinear, antialiased when shrinking), the input
  is built by :func:`dataloaders.inputs.model_input` (so training, validation and test
  agree), and the probabilities are resized back to the stored grid the same way:

  - ``target_spacing`` None: the plane is resized to ``img_size`` (the seed's pixel resize;
    native when ``img_size`` is None).
  - ``target_spacing`` t (mm): the plane is resampled to t mm per pixel in-plane using the
    volume's ``spacing``; the model then runs on the whole resampled plane, zero-padded
    centred to ``img_size`` along any side that is shorter (exactly as training pads). The
    2-D backbones take any size; on the demo model, whole planes gave the same test Dice as
    ``img_size`` tiles with overlap 0.5 (phantoms: equal; real 3D-IRCADb 1: 0.617 against
    0.619) for a third of the work.
- 3-D backbones use MONAI's ``sliding_window_inference`` with Gaussian blending of the
  *probabilities* (sigmoid inside the window predictor, as nnU-Net blends softmax);
  windows run on ``sw_device`` and are stitched on ``device``, so a volume too large
  for the GPU is stitched in host memory (``device="cpu", sw_device="cuda"``);
  :func:`stitch_device` picks the GPU when the volume fits in its free memory.
- ``tta=True`` averages the probabilities over flips (2-D: none, H, W, H+W; 3-D: none,
  H, W, D), each prediction flipped back before averaging.

Thresholding is the caller's job and has one rule, :func:`vessel_mask`: prob >= the
threshold on fp32 probabilities (:func:`binarize`), then connected components under the
checkpoint's ``min_component_mm3`` dropped (validation, test.py, prediction files and
predict.py all use it).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dataloaders.inputs import context_indices, input_channels, model_input
from dataloaders.transforms import resize_planes, spacing_size
from networks.checkpoint import THRESHOLD

WindowFn = Callable[[torch.Tensor], torch.Tensor]

# probabilities >= THRESHOLD are vessel: the project's one threshold rule (checkpoints record it)


def binarize(prob: np.ndarray | torch.Tensor, threshold: float = THRESHOLD) -> np.ndarray:
    """Vessel mask uint8 {0, 1} of probabilities (any shape): prob >= threshold, compared in fp32.

    ``threshold`` is the checkpoint's recorded ``threshold`` where one runs a model file
    (predict.py); everything else uses the default, ``THRESHOLD``.
    """
    if isinstance(prob, torch.Tensor):
        prob = prob.detach().float().cpu().numpy()
    return (np.asarray(prob, dtype=np.float32) >= np.float32(threshold)).astype(np.uint8)


def remove_small_components(mask: np.ndarray, spacing: Sequence[float], min_volume_mm3: float) -> np.ndarray:
    """``mask`` (H, W, D) without its connected components (26-connectivity) smaller than
    ``min_volume_mm3`` mm^3; spacing (row, col, slice) mm. uint8 {0, 1}; 0 keeps every one.

    Why: a vessel tree is a few large components; a 2-D model's false positives and broken
    twigs are many specks. Measured in mm^3 so one setting means the same on every grid.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (H, W, D), got shape {mask.shape}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"spacing must be three positive mm values (row, col, slice), got {tuple(spacing)}")
    if min_volume_mm3 < 0:
        raise ValueError(f"min_volume_mm3 must be >= 0, got {min_volume_mm3}")
    if min_volume_mm3 == 0 or not mask.any():
        return mask.astype(np.uint8)
    from scipy import ndimage  # about 0.3 s to import: only where a volume is post-processed

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    volume = np.bincount(labels.ravel(), minlength=n + 1) * float(np.prod([float(s) for s in spacing]))
    keep = volume >= float(min_volume_mm3)
    keep[0] = False
    return keep[labels].astype(np.uint8)


def vessel_mask(prob: np.ndarray | torch.Tensor, spacing: Sequence[float], threshold: float = THRESHOLD,
                min_component_mm3: float = 0.0) -> np.ndarray:
    """The project's one rule from probabilities (H, W, D) to a vessel mask uint8 {0, 1}:
    :func:`binarize` at ``threshold``, then :func:`remove_small_components` below
    ``min_component_mm3`` mm^3 (the checkpoint's recorded values where one runs a model file)."""
    return remove_small_components(binarize(prob, threshold), spacing, min_component_mm3)


def model_grid(plane: Sequence[int], img_size: Optional[Sequence[int]], target_spacing: Optional[float],
               spacing: Optional[Sequence[float]]) -> tuple[int, int]:
    """(H', W') a stored plane (H, W) is resampled to before the 2-D model sees it.

    ``target_spacing`` set: the plane at that many mm per pixel (``spacing`` (row, col[, slice])
    mm required); else ``img_size``, or the plane itself when that is None.
    """
    if target_spacing is not None:
        if spacing is None:
            raise ValueError("target_spacing needs the volume's spacing (row, col, slice) mm")
        return spacing_size(plane, spacing, float(target_spacing))
    if img_size is None:
        return int(plane[0]), int(plane[1])
    return int(img_size[0]), int(img_size[1])


def flip_sets(spatial_dims: int, tta: bool) -> list[tuple[int, ...]]:
    """Tensor dims to flip for each test-time-augmentation pass ((B, C, *spatial) layout)."""
    if not tta:
        return [()]
    if spatial_dims == 2:
        return [(), (2,), (3,), (2, 3)]
    return [(), (2,), (3,), (4,)]


def _with_tta(predictor: WindowFn, flips: Sequence[tuple[int, ...]]) -> WindowFn:
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
    predictor: WindowFn,
    x: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    sw_device: Optional[str | torch.device] = None,
    progress: bool = False,
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
        progress=progress,
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


def _conv_bn_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Sequential, int]]:
    """(container, i) for every nn.Sequential whose item i is a convolution and item i + 1 a
    BatchNorm with running statistics (the pattern of the U-Nets' double convolutions)."""
    pairs = []
    for seq in model.modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        items = list(seq)
        for i in range(len(items) - 1):
            conv, bn = items[i], items[i + 1]
            if (isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)) and isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
                    and bn.running_mean is not None and bn.num_features == conv.out_channels):
                pairs.append((seq, i))
    return pairs


def inference_model(model: torch.nn.Module, spatial_dims: int) -> torch.nn.Module:
    """A module that computes what ``model`` (in eval mode) computes, faster.

    Each BatchNorm that directly follows a convolution in an ``nn.Sequential`` is folded into
    that convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``), and a 2-D model runs
    channels-last (oneDNN's and cuDNN's preferred layout). With the demo U-Net on one CPU
    thread (8 planes of 336 x 336) the two together took 2.66 s against 5.25 s; outputs agree
    with the original to float rounding (about 1e-6). ``model`` itself is not changed:
    this works on a copy, or returns ``model`` when there is nothing to change (3-D without
    BatchNorm).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("inference_model needs a model in eval mode (call model.eval() first)")
    if not _conv_bn_pairs(model) and spatial_dims != 2:
        return model
    fast = copy.deepcopy(model).eval()
    for seq, i in _conv_bn_pairs(fast):
        seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
        seq[i + 1] = torch.nn.Identity()
    if spatial_dims == 2:
        fast = fast.to(memory_format=torch.channels_last)
    return fast


def _check_model_device(model: torch.nn.Module, device: torch.device) -> None:
    p = next(iter(model.parameters()), None)
    if p is not None and p.device.type != device.type:
        raise ValueError(f"model is on {p.device} but inference was asked to run on {device}; move it first")


def _predict_2d(
    predictor: WindowFn,
    image: np.ndarray,
    salience: Optional[np.ndarray],
    salience_mode: str,
    grid: tuple[int, int],
    tile: Optional[Sequence[int]],
    overlap: float,
    batch_size: int,
    device: torch.device,
    out_device: torch.device,
    progress: bool = False,
    context: int = 0,
) -> torch.Tensor:
    """Probabilities (K, H, W, D) on ``out_device`` (K: the model's output channels): planes
    resampled to ``grid``, the model run on ``tile``-sized sliding windows (None: on the whole
    plane), the result resampled back. ``context``: neighbouring slices on each side in the input."""
    h, w, d = image.shape
    out: Optional[torch.Tensor] = None
    offline = salience is not None and salience_mode == "offline"
    for z0 in tqdm(range(0, d, batch_size), desc="inference", unit="batch", disable=not progress, leave=False):
        z1 = min(z0 + batch_size, d)
        raw = np.moveaxis(image[:, :, z0:z1], 2, 0)[:, None]  # (B, 1, H, W)
        if offline:
            raw = np.concatenate([raw, np.moveaxis(salience[:, :, :, z0:z1], 3, 0)], axis=1)  # (B, 4, H, W)
        if context:
            nb = np.stack([image[:, :, context_indices(z, d, context)] for z in range(z0, z1)])  # (B, H, W, 2K)
            raw = np.concatenate([raw, np.moveaxis(nb, 3, 1)], axis=1)
        planes = resize_planes(torch.from_numpy(np.ascontiguousarray(raw)).to(device), grid).cpu().numpy()
        n_sal = 3 if offline else 0
        sal = np.moveaxis(planes[:, 1:1 + n_sal], 1, 0) if offline else None  # (3, B, H', W')
        nbs = np.moveaxis(planes[:, 1 + n_sal:], 1, 0) if context else None  # (2K, B, H', W')
        x = torch.from_numpy(np.moveaxis(model_input(planes[:, 0], sal, salience_mode, nbs), 0, 1).copy()).to(device)
        if tile is None:
            p = predictor(x)  # (B, 1, H', W') probabilities
        else:
            p = sliding_window_volume(predictor, x, tile, overlap=overlap, batch_size=batch_size, device=device)
        if out is None:
            out = torch.empty((d, p.shape[1], h, w), dtype=torch.float32, device=out_device)
        out[z0:z1] = resize_planes(p, (h, w)).to(out_device)
    return out.permute(1, 2, 3, 0)  # (K, H, W, D)


def predict_volume(
    model: torch.nn.Module | WindowFn,
    image: np.ndarray,
    salience: Optional[np.ndarray],
    *,
    salience_mode: str,
    spatial_dims: int,
    img_size: Optional[Sequence[int]] = None,
    target_spacing: Optional[float] = None,
    spacing: Optional[Sequence[float]] = None,
    patch_size: Optional[Sequence[int]] = None,
    overlap: float = 0.5,
    tta: bool = False,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    sw_device: Optional[str | torch.device] = None,
    progress: bool = False,
    context: int = 0,
) -> np.ndarray:
    """Vessel probabilities float32 (H, W, D) in [0, 1] on the stored grid of ``image``; (K, H, W, D)
    for a model with K > 1 output channels (one sigmoid per class, ``main.py --classes``).

    model: returns logits (B, K, H, W) for input (B, C, H, W) when ``spatial_dims`` is 2,
        (B, K, H, W, D) for (B, C, H, W, D) when 3; C = ``input_channels(salience_mode)``.
        It must already be on ``sw_device or device``; it is put in eval mode for the
        call and its previous mode restored.
    image: (H, W, D) in [0, 1]. salience: (3, H, W, D) in [0, 1], or None unless
        ``salience_mode == "offline"``.
    img_size: (H', W') the 2-D model runs at (resize both ways); None = native. With
        ``target_spacing``: the smallest plane the model sees (None: no padding).
    target_spacing: mm per pixel the 2-D model was trained at (checkpoint ``target_spacing``);
        None = pixel resize to ``img_size``. spacing: the volume's (row, col, slice) mm,
        required with ``target_spacing``. Both are ignored for 3-D models.
    patch_size: (h, w, d) window of a 3-D model (required for 3-D).
    overlap: window overlap fraction in [0, 1) (3-D). batch_size: slices (2-D) or windows
        (3-D) per forward pass. device: where the output is assembled; sw_device: where the
        model runs (default ``device``). progress: a tqdm bar over slice batches (2-D) or
        windows (3-D). context: the 2-D model's ``--context_slices`` (K neighbouring slices on
        each side after the mode's channels, ``dataloaders.inputs.model_input``); 0 for 3-D.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, D), got shape {image.shape}")
    if salience is not None and salience.shape != (3,) + image.shape:
        raise ValueError(f"salience must be (3, H, W, D) = {(3,) + image.shape}, got {salience.shape}")
    input_channels(salience_mode, context)  # validates the mode and the context
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if context and spatial_dims != 2:
        raise ValueError(f"context slices are for 2-D models, got spatial_dims {spatial_dims}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    out_device = torch.device(device)
    run_device = torch.device(sw_device) if sw_device is not None else out_device
    is_module = isinstance(model, torch.nn.Module)
    if is_module:
        _check_model_device(model, run_device)
        # each submodule's own mode comes back afterwards (a trainer may keep some in eval,
        # e.g. BatchNorm under --freeze_bn), not one mode for the whole model
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        net = inference_model(model, spatial_dims)
    else:
        net = model

    def probs(x: torch.Tensor) -> torch.Tensor:
        if spatial_dims == 2 and is_module:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = net(x)
        with torch.autocast(logits.device.type, enabled=False):  # fp32 probabilities, even under AMP
            return torch.sigmoid(logits.float())

    predictor = _with_tta(probs, flip_sets(spatial_dims, tta))
    try:
        with torch.no_grad():
            if spatial_dims == 2:
                grid = model_grid(image.shape[:2], img_size, target_spacing, spacing)
                # the whole resampled plane, zero-padded centred to img_size where it is smaller (as
                # training pads): one window, so no seams and no overlap to pay for (tiles of
                # img_size with overlap 0.5 ran the model on 3x the plane's area)
                tile = None if (target_spacing is None or img_size is None) else tuple(
                    max(int(g), int(t)) for g, t in zip(grid, img_size))
                out = _predict_2d(predictor, image, salience, salience_mode, grid, tile, overlap, batch_size,
                                  run_device, out_device, progress, context)
            else:
                if patch_size is None or len(patch_size) != 3:
                    raise ValueError(f"a 3-D model needs patch_size (h, w, d), got {patch_size}")
                x = torch.from_numpy(model_input(image, salience, salience_mode))[None]  # (1, C, H, W, D)
                out = sliding_window_volume(predictor, x, patch_size, overlap=overlap, batch_size=batch_size,
                                            device=out_device, sw_device=run_device, progress=progress)[0]
            if out.shape[0] == 1:
                out = out[0]
    finally:
        if is_module:
            for m, training in modes:
                m.training = training
    return out.cpu().numpy().astype(np.float32, copy=False)
