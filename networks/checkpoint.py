"""Self-describing checkpoints (cross-team contract 1).

A checkpoint is ``torch.save`` of a dict::

    format        "livervessel-ckpt-v2"
    model_name    registry name ("unet", "unet3d", "monai:BasicUNet", ...)
    model_kwargs  every keyword argument of the backbone's builder, defaults filled in
                  (networks.registry.resolve_kwargs), so a changed default cannot change it
    backbone_source  a plug-in backbone's {"file", "sha256"} (networks.registry.backbone_source;
                  None for a built-in or MONAI one): the weights need that code
    code_version  git commit of the code that wrote it ("<sha>[-dirty][+plugins-<hash>]", or
                  "unknown"; utils.provenance.code_version)
    in_channels   channels of the model input (dataloaders.inputs.input_channels(salience))
    out_channels  1: one logit channel, sigmoid outside; K: one logit per class of
                  ``config["classes"]`` (main.py --classes), each with its own sigmoid
    spatial_dims  2 or 3
    salience      "none" | "offline" | "e2e"
    head_sha256   sha256 of the salience head file used (str) or None
    img_size      [H, W] the 2-D model was trained at (None for 3-D)
    patch_size    [h, w, d] the 3-D model was trained at (None for 2-D)
    target_spacing  mm per pixel the 2-D slices were resampled to in-plane (None: pixel
                  resize to img_size; absent in older files, read as None)
    mm_per_pixel  in-plane mm per pixel the 2-D model saw in training (target_spacing, or the
                  median over training cases of spacing x H / img_size); None when unknown
    config        every training argument (JSON-able dict)
    state_dict, epoch, iteration, best_metric, optimizer, scheduler, scaler

Keys for running the model on a new scan (predict.py); files written before they existed
lack them and readers use :func:`inference_settings`' defaults:

    generator     offline salience only: the generator that made the training maps, embedded
                  {"kind": "bank" | "fpn" | "analytic", "weights_sha256": str,
                   "source": file name it came from, "state_dict": head (bank, 105 KB) or
                   fpn (234 KB) weights, None for analytic, "normalisation": "volume" | "fixed"
                  (absent: "volume")}; None when unknown (then
                  ``predict.py --head FILE`` supplies it)
    hu_window     [lo, hi] HU the image was clipped to before dividing by hi - lo
    threshold     probability at and above which a voxel is vessel
    min_component_mm3  predicted components smaller than this (mm^3) are dropped (0: none)
    manifests     {"dataset": dataset.json, "salience": the maps' manifest} of the training data
                  (utils.manifests; None where the data had none)

``load_model(path)`` rebuilds the model (e2e wrapper included) from the file alone;
``check_compatible`` is the one place a checkpoint is checked against what a run asks for
(backbone, its arguments, salience mode); ``init_from_checkpoint`` starts a model from
another run's weights (``main.py --init_from``).
Format v1 files (written before ``unet``/``unet3d`` became the seed's / release's networks,
model_kwargs as given) still load: ``load_checkpoint`` maps their ``unet``/``unet3d`` to
``unet_bilinear``/``unet3d_bilinear``, the networks they were trained with.
Everything stored is plain tensors / numbers / strings, so files load with
``torch.load(weights_only=True)``: opening a checkpoint runs no pickled code.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from dataloaders.inputs import input_channels
from networks.e2e import build_segmenter
from networks.registry import backbone_source, list_models, resolve_kwargs, spatial_dims_of
from networks.salience import (
    GENERATORS,
    AnalyticGenerator,
    BankGenerator,
    FPNGenerator,
    SalienceHead,
    SeedFPN,
    file_sha256,
    load_fpn,
    load_head,
    make_generator,
)
from utils.atomic import atomic_path
from utils.h5io import HU_WINDOW
from utils.provenance import code_version
from utils.torch_io import load_torch_file

log = logging.getLogger(__name__)

FORMAT = "livervessel-ckpt-v2"
#: probability at and above which a voxel is vessel, recorded in checkpoints (inference.core.vessel_mask)
THRESHOLD = 0.5
# format v1: model_kwargs as given, and "unet"/"unet3d" meant today's *_bilinear networks
LEGACY_FORMAT_V1 = "livervessel-ckpt-v1"
_V1_RENAMES = {"unet": "unet_bilinear", "unet3d": "unet3d_bilinear"}
REQUIRED_KEYS = (
    "format", "model_name", "model_kwargs", "in_channels", "out_channels", "spatial_dims", "salience",
    "head_sha256", "img_size", "patch_size", "config", "state_dict", "epoch", "iteration", "best_metric",
)


def upgrade_v1(ckpt: dict) -> dict:
    """A format-v1 checkpoint dict as format v2: the network it was trained with, by its v2 name."""
    ckpt = dict(ckpt)
    ckpt["model_name"] = _V1_RENAMES.get(ckpt["model_name"], ckpt["model_name"])
    ckpt["model_kwargs"] = resolve_kwargs(ckpt["model_name"], **ckpt["model_kwargs"])
    ckpt.setdefault("code_version", "unknown")
    ckpt["format"] = FORMAT
    return ckpt


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
    target_spacing: Optional[float] = None,
    mm_per_pixel: Optional[float] = None,
    out_channels: int = 1,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    scaler: Any = None,
    generator: Optional[dict] = None,
    hu_window: Sequence[float] = HU_WINDOW,
    threshold: float = THRESHOLD,
    min_component_mm3: float = 0.0,
    manifests: Optional[dict] = None,
) -> None:
    """Write a contract-1 checkpoint atomically (a crash leaves the previous file intact).

    ``generator``: the embedded offline salience generator (:func:`generator_record`);
    ``manifests``: the training data's stage manifests {"dataset": ..., "salience": ...}.
    """
    dims = spatial_dims_of(model_name, **model_kwargs)
    ckpt = {
        "format": FORMAT,
        "model_name": model_name,
        "model_kwargs": resolve_kwargs(model_name, **model_kwargs),
        # a plug-in backbone's file and hash (None for a built-in one): the weights need that code
        "backbone_source": backbone_source(model_name),
        "code_version": code_version(),
        "in_channels": input_channels(salience, context_of(config)),
        "out_channels": int(out_channels),
        "spatial_dims": dims,
        "salience": salience,
        "head_sha256": head_sha256,
        "img_size": [int(s) for s in img_size] if (img_size is not None and dims == 2) else None,
        "patch_size": [int(s) for s in patch_size] if (patch_size is not None and dims == 3) else None,
        "target_spacing": float(target_spacing) if (target_spacing is not None and dims == 2) else None,
        "mm_per_pixel": float(mm_per_pixel) if (mm_per_pixel is not None and dims == 2) else None,
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
        "min_component_mm3": float(min_component_mm3),
        "manifests": manifests or {"dataset": None, "salience": None},
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


#: the project's other .pth files, by format, and what to do with one given where a model belongs
OTHER_FORMATS = {"livervessel-tree-model-v1": "a tree model, for --tree_model"}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint dict; ``ValueError`` naming the file if it is not one."""
    path = Path(path)
    ckpt = load_torch_file(path, "checkpoint file", map_location)
    if isinstance(ckpt, dict) and ckpt.get("format") == LEGACY_FORMAT_V1 and {"model_name", "model_kwargs"} <= set(ckpt):
        try:
            ckpt = upgrade_v1(ckpt)
        except ValueError as e:
            raise ValueError(f"{path}: format v1 checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        if isinstance(ckpt, dict) and isinstance(ckpt.get("format"), str):
            # another of the project's files (a tree model, say) given where a model belongs
            hint = OTHER_FORMATS.get(ckpt["format"])
            raise ValueError(f"{path}: not a {FORMAT} checkpoint but a {ckpt['format']!r} file"
                             + (f": {hint}" if hint else ""))
        what = "a plain state dict" if isinstance(ckpt, dict) and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}"
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (it is {what}; train with main.py to get one)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: {FORMAT} checkpoint lacks keys {missing}")
    return ckpt


def check_compatible(
    ckpt: dict,
    path: str | os.PathLike,
    *,
    backbone: Optional[str] = None,
    model_kwargs: Optional[dict] = None,
    salience: Optional[str] = None,
) -> None:
    """The one check of a checkpoint against a run or a dataset; ValueError naming ``path``.

    Always: ``in_channels`` agrees with the stored salience mode, one output logit, a 3-D
    model has its ``patch_size``. When given: the backbone name, the salience mode (the data
    must supply that input: ``offline`` needs maps, ``none``/``e2e`` the image), and every
    given ``model_kwargs`` entry equals the stored one (stored extra entries, e.g. resolved
    defaults, are allowed).
    """
    if backbone is not None and ckpt["model_name"] != backbone:
        raise ValueError(f"{path}: checkpoint is a {ckpt['model_name']!r} model, not --backbone {backbone!r}")
    context = context_of(ckpt.get("config"))
    expected = input_channels(ckpt["salience"], context)
    if int(ckpt["in_channels"]) != expected:
        raise ValueError(f"{path}: checkpoint takes {ckpt['in_channels']} input channels but salience mode "
                         f"{ckpt['salience']!r} with {context} context slices gives {expected}")
    if salience is not None and ckpt["salience"] != salience:
        raise ValueError(f"{path}: channel mismatch: checkpoint takes {ckpt['in_channels']} channels (salience "
                         f"{ckpt['salience']}, {context} context slices), this run salience {salience}")
    if model_kwargs is not None:
        stored = ckpt.get("model_kwargs") or {}
        differ = {k: (stored.get(k), v) for k, v in model_kwargs.items() if stored.get(k) != v}
        if differ:
            raise ValueError(f"{path}: checkpoint is for {ckpt['model_name']} {stored}, not "
                             f"{backbone or ckpt['model_name']} {model_kwargs} (differ: {differ})")
    classes = (ckpt.get("config") or {}).get("classes")
    if int(ckpt["out_channels"]) != (len(classes) if classes else 1):
        raise ValueError(f"{path}: checkpoint has {ckpt['out_channels']} output channels; "
                         f"{len(classes) if classes else 1} logit(s) expected (classes {classes})")
    if int(ckpt["spatial_dims"]) == 3 and not ckpt.get("patch_size"):
        raise ValueError(f"{path}: 3-D checkpoint without patch_size")


def _fit_report(own: dict, stored: dict) -> str:
    """'' when ``stored`` fits the state dict ``own`` exactly, else what does not fit."""
    missing = [k for k in own if k not in stored]
    unexpected = [k for k in stored if k not in own]
    bad_shapes = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in stored.items() if k in own and own[k].shape != v.shape]
    if not (missing or unexpected or bad_shapes):
        return ""
    return (f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(bad_shapes)} shape mismatches {bad_shapes[:3]}")


def context_of(config: Optional[dict]) -> int:
    """The ``--context_slices`` of a run's config (0 for runs from before the option)."""
    return int((config or {}).get("context_slices") or 0)


def check_backbone_source(ckpt: dict, path: str | os.PathLike = "<checkpoint>") -> None:
    """ValueError naming the file when ``ckpt``'s plug-in backbone is not registered now (its module
    is gone from networks/plugins/); a warning when its source changed since the model was saved."""
    src, name = ckpt.get("backbone_source"), ckpt["model_name"]
    if not src:
        return
    now = backbone_source(name)
    if now is None:
        if name in list_models():  # registered now by other code (a plug-in made a built-in, say)
            log.warning("%s: backbone %r came from the plug-in %s; here other code registers it", path, name,
                        src["file"])
            return
        raise ValueError(f"{path}: its backbone {name!r} came from the plug-in {src['file']} (sha256 "
                         f"{src['sha256'][:12]}), which is not registered here: put that file in networks/plugins/ "
                         f"(if it is there, it failed to import: see the error above)")
    if now["sha256"] != src["sha256"]:
        log.warning("%s: the plug-in %s that defines backbone %r changed since this model was saved (sha256 %s, "
                    "now %s): the weights may not mean what they did", path, now["file"], name, src["sha256"][:12],
                    now["sha256"][:12])


def model_from_checkpoint(ckpt: dict, path: str | os.PathLike = "<checkpoint>") -> nn.Module:
    """Build the model ``ckpt`` describes and load its weights (strict)."""
    check_backbone_source(ckpt, path)
    model = build_segmenter(ckpt["model_name"], ckpt["salience"], ckpt["out_channels"], ckpt["model_kwargs"],
                            context=context_of(ckpt.get("config")))
    problem = _fit_report(model.state_dict(), ckpt["state_dict"])
    if problem:
        raise ValueError(f"{path}: weights do not fit model {ckpt['model_name']} {ckpt['model_kwargs']} "
                         f"(salience {ckpt['salience']}): {problem}")
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


def _split_state(state: dict, e2e: bool) -> tuple[dict, dict]:
    """(backbone weights, salience-head weights) of a model's state dict, backbone keys unprefixed."""
    if not e2e:
        return dict(state), {}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    return backbone, head


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike, *, model_name: str, salience: str,
                         context: int = 0) -> dict:
    """Start ``model`` (a ``build_segmenter(model_name, salience, ...)``) from another run's weights.

    The backbone must match exactly (names and shapes; input channels follow the salience
    mode, so e.g. ``offline`` (3 channels) cannot start a 2-D ``none`` run (1)); the e2e
    salience head is copied too when both runs are e2e, else the model keeps its own.
    Optimiser, schedule and epoch are not taken. Returns the source checkpoint dict.
    ValueError with one line naming ``path`` when the architectures differ, or the source saw
    another number of neighbouring slices than ``context`` (``--context_slices``).
    """
    ckpt = load_checkpoint(path)
    check_backbone_source(ckpt, path)
    if context_of(ckpt.get("config")) != context:
        raise ValueError(f"{path}: --init_from model saw {context_of(ckpt.get('config'))} neighbouring slices on "
                         f"each side, this run --context_slices {context}")
    src_bb, src_head = _split_state(ckpt["state_dict"], ckpt["salience"] == "e2e")
    target = unwrap(model)
    own_bb, own_head = _split_state(target.state_dict(), salience == "e2e")
    problem = _fit_report(own_bb, src_bb)
    if problem:
        raise ValueError(f"{path}: --init_from architecture differs: checkpoint backbone {ckpt['model_name']} "
                         f"{ckpt['model_kwargs']} (salience {ckpt['salience']}) vs this run's {model_name} "
                         f"(salience {salience}): {problem}")
    copy = {("backbone." + k if salience == "e2e" else k): v for k, v in src_bb.items()}
    if src_head and own_head:
        problem = _fit_report(own_head, src_head)
        if problem:
            raise ValueError(f"{path}: --init_from salience head differs from this run's: {problem}")
        copy.update(src_head)
    missing, unexpected = target.load_state_dict(copy, strict=False)
    left_out = [k for k in missing if k not in own_head]
    if unexpected or left_out:  # _fit_report said they fit: only a broken model class gets here
        raise ValueError(f"{path}: --init_from weights did not load: {len(unexpected)} unexpected "
                         f"{unexpected[:3]}, {len(left_out)} missing {left_out[:3]}")
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, checkpoint dict) from a checkpoint file alone."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- inference settings
def generator_record(kind: str, weights: Optional[str | os.PathLike] = None, normalisation: str = "volume") -> dict:
    """The offline generator as embedded in a checkpoint: kind, weights sha256, source name, weights,
    normalisation rule (``networks.salience.NORMALISATIONS``; a record without one is ``volume``).

    ``bank``: the head's ``out_conv.*`` state dict (from our head checkpoint, a model checkpoint
    or a plain state dict); ``fpn``: the seed network's state dict; ``analytic``: no weights.
    Raises ValueError / FileNotFoundError naming ``weights`` when it does not hold them.
    """
    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; valid: {', '.join(GENERATORS)}")
    if kind == "analytic":
        AnalyticGenerator.check_normalisation(normalisation)
        return {"kind": kind, "weights_sha256": "", "source": None, "state_dict": None, "normalisation": normalisation}
    if weights is None:
        raise ValueError(f"generator {kind!r} needs a weights file")
    net = load_head(weights) if kind == "bank" else load_fpn(weights)
    (BankGenerator if kind == "bank" else FPNGenerator).check_normalisation(normalisation)
    return {
        "kind": kind,
        "weights_sha256": file_sha256(weights),
        "source": Path(weights).name,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "normalisation": normalisation,
    }


def inference_settings(ckpt: dict, min_component_mm3: Optional[float] = None) -> dict:
    """What inference on a new scan needs, with defaults for checkpoints written before these keys.

    Returns hu_window (lo, hi), threshold, min_component_mm3, img_size, patch_size, target_spacing,
    generator. ``min_component_mm3`` (test.py / predict.py ``--min_component_mm3``) replaces the
    checkpoint's value; ValueError when it is negative.
    """
    if min_component_mm3 is None:
        min_component_mm3 = ckpt.get("min_component_mm3", 0.0)
    elif min_component_mm3 < 0:
        raise ValueError(f"--min_component_mm3 must be >= 0, got {min_component_mm3}")
    return {
        "hu_window": tuple(float(v) for v in (ckpt.get("hu_window") or HU_WINDOW)),
        "threshold": float(ckpt.get("threshold", THRESHOLD)),
        "min_component_mm3": float(min_component_mm3),
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
    rule = str(rec.get("normalisation", "volume")) if isinstance(rec, dict) else "volume"
    if head is not None:
        kind = rec["kind"] if isinstance(rec, dict) and rec.get("kind") in ("bank", "fpn") else "bank"
        return make_generator(kind, head, rule)
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: checkpoint does not embed its salience generator (written before it did, "
                         f"or its weights were not found at training time); pass --head FILE "
                         f"(the bank head or fpn weights the training maps were made with)")
    kind, sha = rec.get("kind"), str(rec.get("weights_sha256", ""))
    if kind == "analytic":
        return AnalyticGenerator().with_normalisation(rule)
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
    gen = BankGenerator(net, sha) if kind == "bank" else FPNGenerator(net, sha)
    try:
        return gen.with_normalisation(rule)
    except ValueError as e:
        raise ValueError(f"{path}: embedded generator: {e}") from None
