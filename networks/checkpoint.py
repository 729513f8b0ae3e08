"""Self-describing checkpoints (cross-team contract 1).

A checkpoint is ``torch.save`` of a dict::

    format        "livervessel-ckpt-v1"
    model_name    registry name ("unet", "unet3d", "monai:BasicUNet", ...)
    model_kwargs  extra kwargs to build_model (dict)
    in_channels   channels of the model input (dataloaders.inputs.input_channels(salience))
    out_channels  1: one logit channel, sigmoid outside
    spatial_dims  2 or 3
    salience      "none" | "offline" | "e2e"
    head_sha256   sha256 of the salience head file used (str) or None
    img_size      [H, W] the 2-D model was trained at (None for 3-D)
    patch_size    [h, w, d] the 3-D model was trained at (None for 2-D)
    config        every training argument (JSON-able dict)
    state_dict, epoch, iteration, best_metric, optimizer, scheduler, scaler

``load_model(path)`` rebuilds the model (e2e wrapper included) from the file alone.
Everything stored is plain tensors / numbers / strings, so files load with
``torch.load(weights_only=True)``: opening a checkpoint runs no pickled code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from dataloaders.inputs import input_channels
from networks.e2e import build_segmenter
from networks.registry import spatial_dims_of
from utils.atomic import atomic_path
from utils.torch_io import load_torch_file

FORMAT = "livervessel-ckpt-v1"
REQUIRED_KEYS = (
    "format", "model_name", "model_kwargs", "in_channels", "out_channels", "spatial_dims", "salience",
    "head_sha256", "img_size", "patch_size", "config", "state_dict", "epoch", "iteration", "best_metric",
)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel wrappers."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_name: str,
    model_kwargs: dict,
    salience: str,
    config: dict,
    epoch: int,
    iteration: int,
    best_metric: float,
    head_sha256: Optional[str] = None,
    img_size: Optional[Sequence[int]] = None,
    patch_size: Optional[Sequence[int]] = None,
    out_channels: int = 1,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> None:
    """Write a contract-1 checkpoint atomically (a crash leaves the previous file intact)."""
    dims = spatial_dims_of(model_name, **model_kwargs)
    ckpt = {
        "format": FORMAT,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "in_channels": input_channels(salience),
        "out_channels": int(out_channels),
        "spatial_dims": dims,
        "salience": salience,
        "head_sha256": head_sha256,
        "img_size": [int(s) for s in img_size] if (img_size is not None and dims == 2) else None,
        "patch_size": [int(s) for s in patch_size] if (patch_size is not None and dims == 3) else None,
        "config": dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "epoch": int(epoch),
        "iteration": int(iteration),
        "best_metric": float(best_metric),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint dict; ``ValueError`` naming the file if it is not one."""
    path = Path(path)
    ckpt = load_torch_file(path, "checkpoint file", map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = "a plain state dict" if isinstance(ckpt, dict) and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}"
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (it is {what}; train with main.py to get one)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: {FORMAT} checkpoint lacks keys {missing}")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str | os.PathLike = "<checkpoint>") -> nn.Module:
    """Build the model ``ckpt`` describes and load its weights (strict)."""
    model = build_segmenter(ckpt["model_name"], ckpt["salience"], ckpt["out_channels"], ckpt["model_kwargs"])
    own, stored = model.state_dict(), ckpt["state_dict"]
    missing = [k for k in own if k not in stored]
    unexpected = [k for k in stored if k not in own]
    bad_shapes = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in stored.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            f"{path}: weights do not fit model {ckpt['model_name']} {ckpt['model_kwargs']} "
            f"(salience {ckpt['salience']}): {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, shape mismatches {bad_shapes[:3]}"
        )
    model.load_state_dict(stored, strict=True)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, checkpoint dict) from a checkpoint file alone."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    return model.to(device).eval(), ckpt
