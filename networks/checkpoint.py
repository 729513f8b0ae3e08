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

Keys for running the model on a new scan (predict.py); files written before they existed
lack them and readers use :func:`inference_settings`' defaults:

    generator     offline salience only: the generator that made the training maps, embedded
                  {"kind": "bank" | "fpn" | "analytic", "weights_sha256": str,
                   "source": file name it came from, "state_dict": head (bank, 105 KB) or
                   fpn (234 KB) weights, None for analytic}; None when unknown (then
                  ``predict.py --head FILE`` supplies it)
    hu_window     [lo, hi] HU the image was clipped to before dividing by hi - lo
    threshold     probability at and above which a voxel is vessel

``load_model(path)`` rebuilds the model (e2e wrapper included) from the file alone.
Everything stored is plain tensors / numbers / strings, so files load with
``torch.load(weights_only=True)``: opening a checkpoint runs no pickled code.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import h5py
import torch
import torch.nn as nn

from dataloaders.inputs import input_channels
from inference import THRESHOLD
from networks.e2e import build_segmenter
from networks.registry import spatial_dims_of
from networks.salience import (
    GENERATORS,
    AnalyticGenerator,
    BankGenerator,
    FPNGenerator,
    SalienceHead,
    SeedFPN,
    default_head_path,
    file_sha256,
    load_fpn,
    load_head,
    make_generator,
)
from utils.atomic import atomic_path
from utils.h5io import HU_WINDOW
from utils.torch_io import load_torch_file

log = logging.getLogger(__name__)

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
    generator: Optional[dict] = None,
    hu_window: Sequence[float] = HU_WINDOW,
    threshold: float = THRESHOLD,
) -> None:
    """Write a contract-1 checkpoint atomically (a crash leaves the previous file intact).

    ``generator``: the embedded offline salience generator (:func:`generator_record`).
    """
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
        "generator": generator if salience == "offline" else None,
        "hu_window": [float(v) for v in hu_window],
        "threshold": float(threshold),
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


# ----------------------------------------------------------------------------- inference settings
def generator_record(kind: str, weights: Optional[str | os.PathLike] = None) -> dict:
    """The offline generator as embedded in a checkpoint: kind, weights sha256, source name, weights.

    ``bank``: the head's ``out_conv.*`` state dict (from our head checkpoint, a model checkpoint
    or a plain state dict); ``fpn``: the seed network's state dict; ``analytic``: no weights.
    Raises ValueError / FileNotFoundError naming ``weights`` when it does not hold them.
    """
    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; valid: {', '.join(GENERATORS)}")
    if kind == "analytic":
        return {"kind": kind, "weights_sha256": "", "source": None, "state_dict": None}
    if weights is None:
        raise ValueError(f"generator {kind!r} needs a weights file")
    net = load_head(weights) if kind == "bank" else load_fpn(weights)
    return {
        "kind": kind,
        "weights_sha256": file_sha256(weights),
        "source": Path(weights).name,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
    }


def find_offline_generator(salience_file: str | os.PathLike, search: Sequence[str | os.PathLike]) -> Optional[dict]:
    """The generator that wrote ``salience_file`` (its attrs ``generator`` / ``weights_sha256``), embedded.

    The weights are found by hash among the ``.pth`` files in ``search`` (files or folders,
    e.g. the shipped head and ``<output_root>/salience/<dataset>/``). None (and a warning) when
    the map or its weights cannot be found: the checkpoint then needs ``predict.py --head``.
    """
    salience_file = Path(salience_file)
    if not salience_file.is_file():
        return None
    with h5py.File(salience_file, "r") as f:
        kind, sha = str(f.attrs.get("generator", "")), str(f.attrs.get("weights_sha256", ""))
    if kind == "analytic":
        return generator_record(kind)
    if kind not in ("bank", "fpn") or not sha:
        log.warning("%s: salience made by %r without a weights hash: the checkpoint will not embed its "
                    "generator (predict.py then needs --head FILE)", salience_file, kind or "?")
        return None
    candidates: list[Path] = []
    for item in [*search, default_head_path()]:
        item = Path(item)
        candidates.extend(sorted(item.glob("*.pth")) if item.is_dir() else [item] if item.is_file() else [])
    for cand in dict.fromkeys(candidates):
        if file_sha256(cand) == sha:
            return generator_record(kind, cand)
    log.warning("%s: no file with the %s weights (sha256 %s...) in %s: the checkpoint will not embed its "
                "generator (predict.py then needs --head FILE)", salience_file, kind, sha[:12],
                ", ".join(str(Path(s)) for s in search) or "-")
    return None


def inference_settings(ckpt: dict) -> dict:
    """What inference on a new scan needs, with defaults for checkpoints written before these keys.

    Returns hu_window (lo, hi), threshold, img_size, patch_size, target_spacing, generator.
    """
    return {
        "hu_window": tuple(float(v) for v in (ckpt.get("hu_window") or HU_WINDOW)),
        "threshold": float(ckpt.get("threshold", THRESHOLD)),
        "img_size": ckpt.get("img_size"),
        "patch_size": ckpt.get("patch_size"),
        "target_spacing": ckpt.get("target_spacing"),
        "generator": ckpt.get("generator"),
    }


def generator_from_checkpoint(ckpt: dict, path: str | os.PathLike = "<checkpoint>",
                              head: Optional[str | os.PathLike] = None) -> Any:
    """The offline salience generator of an ``offline`` checkpoint (networks.salience generators).

    ``head``: a weights file that replaces the embedded generator (required for checkpoints
    that do not embed one; its kind is the embedded one's, else ``bank``). Raises ValueError
    naming the file when neither is there or the weights do not fit.
    """
    if ckpt.get("salience") != "offline":
        raise ValueError(f"{path}: salience mode {ckpt.get('salience')!r} has no offline generator")
    rec = ckpt.get("generator")
    if head is not None:
        kind = rec["kind"] if isinstance(rec, dict) and rec.get("kind") in ("bank", "fpn") else "bank"
        return make_generator(kind, head)
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: checkpoint does not embed its salience generator (written before it did, "
                         f"or its weights were not found at training time); pass --head FILE "
                         f"(the bank head or fpn weights the training maps were made with)")
    kind, sha = rec.get("kind"), str(rec.get("weights_sha256", ""))
    if kind == "analytic":
        return AnalyticGenerator()
    net: nn.Module
    if kind == "bank":
        net = SalienceHead()
    elif kind == "fpn":
        net = SeedFPN()
    else:
        raise ValueError(f"{path}: embedded generator of unknown kind {kind!r}")
    try:
        net.load_state_dict(rec["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: embedded {kind} generator weights do not load "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return BankGenerator(net, sha) if kind == "bank" else FPNGenerator(net, sha)
