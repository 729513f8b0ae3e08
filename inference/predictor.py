"""One path from an image to a vessel mask, for validation, test.py and predict.py.

A :class:`Predictor` holds a model and everything its input and output need: salience mode
and dimensionality, the resize rule (``img_size`` / ``target_spacing`` / ``patch_size``), the
offline salience generator with its normalisation rule, the threshold and the smallest
component kept. Built from a checkpoint alone (:meth:`Predictor.from_checkpoint`: test.py and
predict.py) or around the model being trained (:meth:`Predictor.for_training`: validation),
it runs the same three steps for all of them:

    salience(image)                           offline maps from the generator (or None)
    probabilities(image, spacing, salience)   inference.core.predict_volume
    mask(prob, spacing, roi)                  inference.core.vessel_mask inside ``roi``

and, for a whole scan in HU, :meth:`Predictor.predict_scan` (HU window, optional crop to the
liver's slices as in training, the three steps, back onto the scan's grid).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from dataloaders.inputs import input_channels
from inference.core import THRESHOLD, predict_volume, stitch_device, vessel_mask
from networks.checkpoint import (context_of, generator_from_checkpoint, inference_settings, load_checkpoint,
                                 model_from_checkpoint)
from networks.salience import salience_3d
from preprocessing.dicom_reader import PatientData
from preprocessing.pipeline import to_volume
from utils.h5io import HU_WINDOW
from utils.provenance import file_sha256

log = logging.getLogger("predict")

#: warn when a case's mm per pixel differs by more than this from training's
SPACING_TOLERANCE = 0.2
#: the generator is run on the bounding box of the non-zero image when that saves at least this fraction
SALIENCE_ROI_MIN_SAVING = 0.1


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; ValueError for CUDA asked for on a machine without."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return device


def training_spacing(ckpt: Optional[dict]) -> Optional[tuple[float, float, float]]:
    """Median (row, col, slice) spacing in mm of the data a checkpoint was trained on: every case of
    its dataset manifest (validation and test cases included, preprocessed alike); None for
    checkpoints written before manifests."""
    dataset = ((ckpt or {}).get("manifests") or {}).get("dataset") or {}
    spacings = [c["spacing"] for c in (dataset.get("cases") or {}).values() if len(c.get("spacing", ())) == 3]
    if not spacings:
        return None
    med = np.median(np.asarray(spacings, dtype=float), axis=0)
    return float(med[0]), float(med[1]), float(med[2])


def spacing_warning(case: str, spacing: Sequence[float], plane: Sequence[int], ckpt: dict,
                    img_size: Optional[Sequence[int]]) -> Optional[str]:
    """A warning when ``case`` (in-plane ``spacing`` mm, plane (H, W)) is more than 20% off the mm per
    pixel the model was trained at in the direction that matters (below); None otherwise or when
    that is unknown.

    2-D: with a checkpoint ``target_spacing`` t the case is resampled to t, and only a case coarser
    than t is warned about: upsampled, its vessels are blurrier than the model learnt them (a finer
    case is downsampled to what the model was trained on, as real CT at 0.57-0.87 mm is for a
    0.9 mm model, and a warning on every such scan would be noise); with a pixel resize the model sees row spacing x H /
    img_size H mm per pixel, compared with the checkpoint's ``mm_per_pixel``. 3-D: the model runs on
    the stored grid, so the case's row spacing is compared with the training cases' median.
    """
    native = float(spacing[0])
    if ckpt.get("spatial_dims") == 3:
        trained_3d = training_spacing(ckpt)
        if trained_3d and abs(native / trained_3d[0] - 1) > SPACING_TOLERANCE:
            return (f"{case}: {native:.3g} mm/voxel in-plane, {abs(native / trained_3d[0] - 1):.0%} off the "
                    f"{trained_3d[0]:.3g} mm of the training data; a 3-D model runs on the scan's own grid, so "
                    f"vessels are wider or narrower in voxels than it learnt (resample the scan, or train on data "
                    f"at its spacing)")
        return None
    target = ckpt.get("target_spacing")
    if target:
        if native / target - 1 > SPACING_TOLERANCE:
            return (f"{case}: {native:.3g} mm/pixel, {native / target - 1:.0%} coarser than the {target:.3g} "
                    f"mm/pixel the model was trained at; upsampled to it, so thin vessels are blurrier than it learnt")
        return None
    trained = ckpt.get("mm_per_pixel")
    if not trained:
        return None
    seen = native * (plane[0] / img_size[0] if img_size else 1.0)
    if abs(seen / trained - 1) > SPACING_TOLERANCE:
        return (f"{case}: the model sees {seen:.3g} mm/pixel ({native:.3g} mm x {plane[0]}/"
                f"{img_size[0] if img_size else plane[0]} px), {abs(seen / trained - 1):.0%} off the "
                f"{trained:.3g} mm/pixel it was trained at (train with --target_spacing to resample by millimetres)")
    return None


def offline_salience(image: np.ndarray, generator: Any, device: str = "cpu", progress: bool = False) -> np.ndarray:
    """Three-plane salience (3, H, W, D) in [0, 1] of ``image`` (H, W, D), equal to ``salience_3d``.

    Only the bounding box of the non-zero image, widened by the generator's receptive radius,
    is filtered: every plane keeps all its positive pixels (so its standardisation is the
    same), and outside the box the plane is zero within the receptive radius, where the
    generator gives one constant (its ``zero_value()``). The volume normalisation then runs on
    the whole array as in ``salience_3d``. Air and fat are 0 after the HU window, so on a
    whole-abdomen scan this skips a large part of the work.
    """
    nz = image > 0
    if not nz.any():
        return salience_3d(image, generator, device=device, progress=progress)
    m = generator.margin
    box = []
    for ax in range(3):
        idx = np.flatnonzero(nz.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(max(int(idx[0]) - m, 0), min(int(idx[-1]) + 1 + m, image.shape[ax])))
    box_t = tuple(box)
    kept = float(np.prod([s.stop - s.start for s in box_t])) / image.size
    if kept > 1.0 - SALIENCE_ROI_MIN_SAVING:
        return salience_3d(image, generator, device=device, progress=progress)
    generator.to(device)
    raw = np.full((3,) + image.shape, float(generator.zero_value()), dtype=np.float32)
    raw[(slice(None),) + box_t] = salience_3d(np.ascontiguousarray(image[box_t]), generator, device=device,
                                              normalise=False, progress=progress)
    return generator.finalize(raw)


@dataclass
class Prediction:
    """Probabilities float32 ((H, W, D), or (K, H, W, D) for a model of K classes) and mask bool
    (H, W, D, the union of the classes) on the scan's grid; the crop (6 ints, the start / stop per
    axis of the part the model saw); ``labels`` uint8 (H, W, D), 0 background and k + 1 for class
    k (:mod:`inference.trees`), for a model of classes, else None."""

    prob: np.ndarray
    mask: np.ndarray
    crop: tuple[int, ...]
    labels: Optional[np.ndarray] = None


@dataclass
class Predictor:
    """A model with every setting inference needs (see the module docstring).

    ``device``: where the model runs; ``generator``: the offline salience generator
    (``networks.salience``), None for the other modes; ``path`` / ``ckpt`` / ``sha256``: the
    model file, when built from one; ``classes``: the class names of a model with one output
    per class (``main.py --classes``), None for a binary model; ``context_slices``: a 2-D
    model's neighbouring slices on each side (``main.py --context_slices``).
    """

    model: torch.nn.Module
    salience_mode: str
    spatial_dims: int
    img_size: Optional[Sequence[int]] = None
    patch_size: Optional[Sequence[int]] = None
    target_spacing: Optional[float] = None
    threshold: float = THRESHOLD
    min_component_mm3: float = 0.0
    hu_window: tuple[float, float] = HU_WINDOW
    generator: Any = None
    device: str = "cpu"
    path: Optional[Path] = None
    ckpt: Optional[dict] = None
    sha256: str = ""
    classes: Optional[list[str]] = None
    context_slices: int = 0

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.spatial_dims == 3 and not self.patch_size:
            raise ValueError(f"{self.path or 'model'}: a 3-D model needs its patch_size")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", head: Optional[str | os.PathLike] = None,
                        min_component_mm3: Optional[float] = None, img_size: Optional[Sequence[int]] = None,
                        with_generator: bool = True, sha256: Optional[str] = None) -> "Predictor":
        """Everything from one model file (``networks.checkpoint``).

        ``head`` replaces (or, for checkpoints that do not embed it, supplies) the offline
        generator's weights; ``min_component_mm3`` and ``img_size`` replace the file's settings;
        ``with_generator=False``: the caller passes stored maps (test.py), so an offline model
        needs no generator; ``sha256``: the file's hash when the caller has it already.
        ValueError naming the file when it cannot be used.
        """
        path = Path(path)
        return cls.from_checkpoint_dict(load_checkpoint(path), path, device, head, min_component_mm3, img_size,
                                        with_generator, sha256 or file_sha256(path))

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict, path: str | os.PathLike, device: str = "auto",
                             head: Optional[str | os.PathLike] = None, min_component_mm3: Optional[float] = None,
                             img_size: Optional[Sequence[int]] = None, with_generator: bool = True,
                             sha256: str = "") -> "Predictor":
        """:meth:`from_checkpoint` of a checkpoint dict already read (``networks.checkpoint.
        load_checkpoint``), e.g. a liver model embedded in a vessel model file; ``path`` names it
        in messages, ``sha256`` is the hash of the file it came from."""
        path = Path(path)
        device = resolve_device(device)
        model = model_from_checkpoint(ckpt, path).to(device).eval()
        classes = (ckpt.get("config") or {}).get("classes")
        if int(ckpt["out_channels"]) != (len(classes) if classes else 1):
            raise ValueError(f"{path}: model has {ckpt['out_channels']} output channels; "
                             f"{len(classes) if classes else 1} expected (classes {classes})")
        settings = inference_settings(ckpt, min_component_mm3=min_component_mm3)
        if tuple(settings["hu_window"]) != tuple(HU_WINDOW):
            raise ValueError(f"{path}: model was trained on HU window {settings['hu_window']}, but the "
                             f"preprocessing code windows to {HU_WINDOW}")
        generator = None
        if ckpt["salience"] == "offline" and (with_generator or head is not None):
            generator = generator_from_checkpoint(ckpt, path, head)
        elif head is not None:
            log.warning("--head ignored: the model uses salience %r, not offline", ckpt["salience"])
        dims = int(ckpt["spatial_dims"])
        return cls(model, ckpt["salience"], dims,
                   img_size=list(img_size) if img_size is not None else settings["img_size"],
                   patch_size=settings["patch_size"], target_spacing=settings["target_spacing"],
                   threshold=settings["threshold"], min_component_mm3=settings["min_component_mm3"],
                   hu_window=tuple(settings["hu_window"]), generator=generator, device=device, path=path,
                   ckpt=ckpt, sha256=sha256, classes=list(classes) if classes else None,
                   context_slices=context_of(ckpt.get("config")))

    @classmethod
    def for_training(cls, model: torch.nn.Module, cfg: Any, spatial_dims: int, device: str | torch.device) -> "Predictor":
        """The model being trained, with the run's settings (``train_config.TrainConfig``); its
        offline maps come from the dataset, so there is no generator."""
        return cls(model, cfg.salience, spatial_dims, img_size=cfg.img_size if spatial_dims == 2 else None,
                   patch_size=cfg.patch_size if spatial_dims == 3 else None,
                   target_spacing=cfg.target_spacing if spatial_dims == 2 else None,
                   min_component_mm3=cfg.min_component_mm3, device=str(device),
                   classes=list(cfg.classes) if getattr(cfg, "classes", None) else None,
                   context_slices=int(getattr(cfg, "context_slices", 0)))

    # ------------------------------------------------------------------ the three steps
    def salience(self, image: np.ndarray, progress: bool = False) -> Optional[np.ndarray]:
        """Offline maps (3, H, W, D) of ``image`` (H, W, D) in [0, 1] from the generator; None for
        the other modes."""
        if self.salience_mode != "offline":
            return None
        if self.generator is None:
            raise ValueError("this predictor has no salience generator: pass the stored maps")
        return offline_salience(image, self.generator, device=self.device, progress=progress)

    def probabilities(self, image: np.ndarray, spacing: Sequence[float], salience: Optional[np.ndarray] = None, *,
                      tta: bool = False, overlap: float = 0.5, batch_size: int = 8,
                      progress: bool = False) -> np.ndarray:
        """Vessel probabilities float32 (H, W, D) of ``image`` (H, W, D) in [0, 1], ``spacing`` mm.

        ``salience``: (3, H, W, D) stored maps (test.py, validation); None computes them with the
        generator (offline mode) or needs none.
        """
        if self.salience_mode == "offline" and salience is None:
            salience = self.salience(image, progress=progress)
        two_d = self.spatial_dims == 2
        return predict_volume(
            self.model, image, salience, salience_mode=self.salience_mode, spatial_dims=self.spatial_dims,
            img_size=self.img_size if two_d else None, target_spacing=self.target_spacing if two_d else None,
            spacing=spacing, patch_size=self.patch_size if not two_d else None, overlap=overlap, tta=tta,
            batch_size=batch_size,
            # windows on the model's device, stitched there when the volume fits (else in host memory)
            device=stitch_device(image.shape, input_channels(self.salience_mode, self.context_slices), self.device),
            sw_device=self.device, progress=progress, context=self.context_slices,
        )

    def mask(self, prob: np.ndarray, spacing: Sequence[float], roi: Optional[np.ndarray] = None) -> np.ndarray:
        """The vessel mask bool (H, W, D): threshold, then components under ``min_component_mm3``
        dropped, all inside ``roi`` when given (a component's size is what lies in it). For class
        probabilities (K, H, W, D): the union of the classes (:func:`inference.trees.tree_labels`)."""
        if np.ndim(prob) == 4:
            prob = np.asarray(prob).max(axis=0)  # the union: the binary rule on the largest class probability
        if roi is not None:
            prob = np.where(roi, prob, 0.0)
        return vessel_mask(prob, spacing, self.threshold, self.min_component_mm3).astype(bool)

    def labels(self, prob: np.ndarray, spacing: Sequence[float], roi: Optional[np.ndarray] = None,
               consistent: bool = True) -> np.ndarray:
        """Label map uint8 (H, W, D) of class probabilities (K, H, W, D): 0 background, k + 1 for
        class k (:func:`inference.trees.tree_labels`), each connected piece made one tree where
        it is mostly one (``consistent``, :func:`inference.trees.consistent_trees`)."""
        from inference.trees import consistent_trees, tree_labels

        lab = tree_labels(prob, spacing, self.threshold, self.min_component_mm3, roi)
        return consistent_trees(lab) if consistent else lab

    # ------------------------------------------------------------------ a whole scan
    def predict_scan(self, hu: np.ndarray, spacing: Sequence[float], liver: Optional[np.ndarray] = None, *,
                     name: str = "scan", tta: bool = False, batch_size: int = 8, overlap: float = 0.5,
                     clock: Any = None) -> Prediction:
        """Vessel probabilities and mask of a scan ``hu`` (H, W, D) in HU, ``spacing`` (row, col, slice) mm.

        With ``liver`` (bool (H, W, D)) the volume is cropped to the liver's slices as in training
        (``preprocess.py``'s default ``liver_z`` crop) and both outputs are zero outside the liver.
        ``clock`` (a stopwatch with ``lap(name)``) gets the laps window, salience and inference.
        """
        lap = clock.lap if clock is not None else (lambda _name: 0.0)
        data = PatientData(hu, tuple(spacing), None, None if liver is None else liver.astype(np.uint8), name)
        vol = to_volume(data, "liver_z" if liver is not None else "none", 0, warn_no_liver=True)
        if liver is not None and not liver.any():
            log.warning("%s: the liver mask is empty: the output is empty", name)
        lap("window")
        sal = self.salience(vol.image, progress=True)
        lap("salience")
        prob_c = self.probabilities(vol.image, spacing, sal, tta=tta, overlap=overlap, batch_size=batch_size,
                                    progress=True)
        lap("inference")
        c = vol.crop
        prob = np.zeros(prob_c.shape[:-3] + tuple(hu.shape), dtype=np.float32)
        prob[..., c[0]:c[1], c[2]:c[3], c[4]:c[5]] = prob_c
        if liver is not None:
            prob[..., ~liver] = 0.0
        if prob.ndim == 4:
            labels = self.labels(prob, spacing)
            return Prediction(prob, labels > 0, tuple(c), labels)
        return Prediction(prob, self.mask(prob, spacing), tuple(c))

    def describe(self) -> dict:
        """The model file and its settings, as recorded in predict.py's stats.json."""
        gen = (self.ckpt or {}).get("generator")
        return {
            "path": str(self.path), "sha256": self.sha256,
            "model_name": (self.ckpt or {}).get("model_name"), "model_kwargs": (self.ckpt or {}).get("model_kwargs"),
            "spatial_dims": self.spatial_dims, "salience": self.salience_mode,
            "generator": None if self.generator is None else {
                "kind": self.generator.name, "weights_sha256": self.generator.weights_sha256,
                "normalisation": self.generator.normalisation, "embedded": isinstance(gen, dict)},
            "hu_window": list(self.hu_window), "threshold": self.threshold,
            "min_component_mm3": self.min_component_mm3, "img_size": self.img_size, "patch_size": self.patch_size,
            "target_spacing": self.target_spacing, "epoch": (self.ckpt or {}).get("epoch"),
            "classes": self.classes, "context_slices": self.context_slices,
        }
