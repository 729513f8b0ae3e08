"""The liver, found automatically: a liver model's mask and the region vessels are kept in.

A *liver model* is an ordinary checkpoint of ``main.py`` trained on a dataset whose label is the
liver mask (``preprocess.py --vessels liver --crop none``: whole scans, so the model learns where
the liver ends); ``scripts/train_liver.sh`` makes one. It runs through the same
:class:`inference.predictor.Predictor` as a vessel model. Here:

- :func:`model_target`: what a checkpoint was trained to segment ("liver" or "vessels"), from
  the dataset manifest it carries, so a vessel model given as a liver model (or the reverse) is
  refused in one line instead of giving a silent nonsense mask.
- :func:`liver_from_probabilities`: the liver mask of the model's probabilities: threshold, an
  opening with a ball of ``opening_mm`` (the liver is a smooth organ: this cuts thin bridges to
  the portal vein, the IVC or the stomach at the hilum, where the model errs most), the
  largest 26-connected component (the liver is one organ; spleen or heart false positives are
  separate pieces), holes filled (vessels and lesions inside the liver are liver).
- :func:`refine_by_intensity`: that mask corrected at its surface by the scan's own parenchyma
  intensity (neighbour organs the model took for liver out, an edge placed too far in out to it).
- :func:`near_liver`: the voxels within ``margin_mm`` millimetres of the liver, where predicted
  vessels are kept (a margin keeps the portal vein and hepatic veins at the hilum, which the
  liver mask cuts).
- :func:`segment_liver`: a whole scan in HU -> liver mask (and the model's own, unrefined), through
  a liver model's Predictor.
- :func:`liver_warnings`: what a user should check in a liver mask before trusting the vessel
  statistics computed in it (a volume no adult liver has, a liver the scan cuts off).
- :func:`embed_liver_model` / :func:`embedded_liver_model`: one vessel model file that carries
  its liver model (``scripts/embed_liver.py``), so ``predict.py --model`` alone finds the liver.

Arrays are (H, W, D) (rows, columns, slices); spacing is (row, col, slice) in mm.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from inference.predictor import Predictor
from networks.checkpoint import FORMAT, load_checkpoint
from utils.atomic import atomic_path
from utils.boxes import bounding_box
from utils.provenance import file_sha256

log = logging.getLogger("predict")

#: the dataset label that makes a checkpoint a liver model (preprocess.py --vessels liver)
LIVER_LABEL = ["liver"]
#: predicted vessels farther than this from the predicted liver are removed (mm); the hilum's
#: vessels run a few millimetres outside the liver mask before they enter it
DEFAULT_MARGIN_MM = 5.0
#: the vessel checkpoint key holding an embedded liver model: {"sha256": of the liver model file,
#: "source": its file name, "checkpoint": its checkpoint dict without the optimiser's state}
EMBED_KEY = "liver_model"
#: training state a liver model needs no more once embedded
_TRAINING_STATE = ("optimizer", "scheduler", "scaler")
#: radius (mm) of the opening of the predicted liver: on real patients 1 and 7 (liver models
#: trained on the other one) 3, 5 and 8 mm raised the liver Dice by 0.003-0.008, 5 mm most
DEFAULT_OPENING_MM = 5.0
#: liver volumes (mL) outside this range are reported as implausible for an adult: healthy adult
#: livers hold about 1,000-2,500 mL (3D-IRCADb's patients 1 and 7: 1,489 and 1,430 mL, record
#: liver_bench); the range is wide so that enlarged and resected livers pass and a model that
#: found a kidney or half a liver does not
PLAUSIBLE_LIVER_ML = (700.0, 3500.0)
#: a liver counts as cut off by the scan's end only where its cross-section in the end slice is
#: at least this share of its largest: a tip that grazes the end (the dome, or a model's last
#: false-positive voxels above it: 1.6% on real patient 7, whose scan holds the whole liver) is no cut
CUT_OFF_AREA = 0.1

#: intensity refinement of the model's liver (:func:`refine_by_intensity`). Chosen on real
#: patients 1 and 7 with liver models trained on the other one (there is no third patient to
#: choose on): the surface band where off-liver intensities are removed (mm), how many robust
#: deviations from the parenchyma's median count as off-liver, how far the mask may grow (mm),
#: within how many deviations and above which model probability, and how deep the reference
#: parenchyma lies (mm), the model probability it needs and how many of its voxels
REFINE_BAND_MM = 10.0
REFINE_REMOVE_Z = 2.5
REFINE_GROW_MM = 3.0
REFINE_GROW_Z = 2.0
REFINE_GROW_PROB = 0.1
REFINE_CORE_MM = 5.0
PARENCHYMA_MIN_PROB = 0.9
PARENCHYMA_MIN_VOXELS = 1000


def model_target(ckpt: dict) -> Optional[str]:
    """"liver" when ``ckpt``'s training data were labelled with the liver mask, "vessels" when with
    vessel masks, None when the checkpoint carries no dataset manifest (trained before manifests
    or on a dataset without one)."""
    dataset = ((ckpt or {}).get("manifests") or {}).get("dataset")
    if not dataset:
        return None
    classes = [str(c).lower() for c in dataset.get("vessel_classes") or []]
    return "liver" if classes == LIVER_LABEL else "vessels"


def check_target(ckpt: dict, path: str, want: str) -> None:
    """ValueError naming ``path`` when the model was trained for the other target than ``want``
    ("liver" or "vessels"); a model without a manifest is let through with a warning."""
    got = model_target(ckpt)
    if got is None:
        log.warning("%s: the model file does not say what it was trained on (no dataset manifest); "
                    "assuming a %s model", path, want)
    elif got != want:
        raise ValueError(f"{path}: this is a {got} model (its training labels were "
                         f"{ckpt['manifests']['dataset'].get('vessel_classes')}), not a {want} model")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``mask`` (bool, any 3-D shape); empty stays empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 1:
        return mask.copy()
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def liver_from_probabilities(prob: np.ndarray, threshold: float = 0.5, spacing: Optional[Sequence[float]] = None,
                             opening_mm: float = 0.0) -> np.ndarray:
    """Liver mask bool (H, W, D) of liver probabilities (H, W, D): prob >= ``threshold``, opened
    with a ball of ``opening_mm`` mm (needs ``spacing``, (row, col, slice) mm; 0: no opening), the
    largest 26-connected component, holes filled (:func:`fill_holes`)."""
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"liver probabilities must be (H, W, D), got shape {prob.shape}")
    if opening_mm < 0 or (opening_mm > 0 and (spacing is None or len(spacing) != 3)):
        raise ValueError(f"an opening of {opening_mm} mm needs opening_mm >= 0 and three spacings, got {spacing}")
    out = np.zeros(prob.shape, dtype=bool)
    box = bounding_box(prob >= np.float32(threshold))
    if box is None:
        return out
    # the work runs on bounding boxes: a whole 512 x 512 x 150 scan is 40 M voxels
    liver = prob[box] >= np.float32(threshold)
    if opening_mm > 0:
        liver = opening(liver, spacing, opening_mm)
    liver = largest_component(liver)
    if not liver.any():
        return out
    out[box] = fill_holes(liver)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (bool (H, W, D)) with its holes filled in 3-D and then slice by slice (a vessel
    running through the liver leaves a hole open to the outside in 3-D but closed in its slice)."""
    mask = np.array(mask, dtype=bool)
    inner = bounding_box(mask, margin=1)
    if inner is None:
        return mask
    sub = ndimage.binary_fill_holes(mask[inner])
    for z in np.flatnonzero(sub.any(axis=(0, 1))):
        sub[:, :, z] = ndimage.binary_fill_holes(sub[:, :, z])
    mask[inner] = sub
    return mask


def parenchyma_hu(liver: np.ndarray, prob: np.ndarray, hu: np.ndarray, spacing: Sequence[float], *,
                  depth: Optional[np.ndarray] = None) -> Optional[tuple[float, float]]:
    """(median, robust standard deviation) in HU of a scan's liver parenchyma, or None without
    :data:`PARENCHYMA_MIN_VOXELS` reference voxels. ``liver`` bool (H, W, D), ``prob`` the liver
    model's probabilities (H, W, D), ``hu`` (H, W, D), ``spacing`` (row, col, slice) mm; ``depth``
    (:func:`depth_mm` of ``liver``) when the caller has it.

    The reference voxels lie deeper than ``REFINE_CORE_MM`` in the mask and the model gives them
    at least ``PARENCHYMA_MIN_PROB``; the deviation is 1.4826 x their median absolute deviation,
    at least 1 HU."""
    liver = np.asarray(liver, dtype=bool)
    if liver.ndim != 3 or np.shape(prob) != liver.shape or np.shape(hu) != liver.shape or len(spacing) != 3:
        raise ValueError(f"liver, prob and hu must be (H, W, D) of one shape with 3 spacings, got {liver.shape}, "
                         f"{np.shape(prob)}, {np.shape(hu)} and {tuple(spacing)}")
    if depth is None:
        depth = depth_mm(liver, spacing)
    reference = np.asarray(hu)[(depth > REFINE_CORE_MM) & (np.asarray(prob) >= PARENCHYMA_MIN_PROB)]
    if reference.size < PARENCHYMA_MIN_VOXELS:
        return None
    median = float(np.median(reference))
    return median, max(1.4826 * float(np.median(np.abs(reference - median))), 1.0)


def refine_by_intensity(liver: np.ndarray, prob: np.ndarray, hu: np.ndarray, spacing: Sequence[float], *,
                        band_mm: float = REFINE_BAND_MM, remove_z: float = REFINE_REMOVE_Z,
                        grow_mm: float = REFINE_GROW_MM, grow_z: float = REFINE_GROW_Z,
                        grow_prob: float = REFINE_GROW_PROB) -> np.ndarray:
    """The liver mask ``liver`` (bool (H, W, D)) corrected at its surface by the scan's own liver
    intensity; ``prob`` (H, W, D) the liver model's probabilities, ``hu`` (H, W, D) the scan in HU,
    ``spacing`` (row, col, slice) mm.

    The liver model errs most at the surface, where the stomach, the heart or the bowel touch the
    liver, and a 2-D model at 2.5 mm per pixel cannot place the edge finely. The parenchyma's
    intensity is measured in the scan itself: the median and the robust standard deviation
    (1.4826 x the median absolute deviation) of the voxels deeper than 5 mm in the mask that the
    model gives at least 0.9 (contrast phase, scanner and noise differ from scan to scan, so no
    fixed HU range is assumed). Then, in one step:

    - voxels of the mask within ``band_mm`` of its surface whose HU lies more than ``remove_z``
      deviations from the median are removed (a neighbour organ the model took for liver);
    - voxels outside the mask within ``grow_mm`` of it, with HU within ``grow_z`` deviations and a
      model probability of at least ``grow_prob``, are added (an edge the model placed too far in);
    - the largest 26-connected component is kept and holes are filled (:func:`fill_holes`), so
      lesions and vessels enclosed by the liver (in 3-D or in their slice), whose HU differ from
      the parenchyma's, stay liver; those that reach the surface within the band, the hilum's
      vessels included, are removed with the neighbour organs (``bench/liver_bench.py`` reports
      this cost: the refinement applied to the true liver mask).

    Without :data:`PARENCHYMA_MIN_VOXELS` reference voxels (a tiny or empty liver) the mask is
    returned unchanged. Work runs on the mask's bounding box widened by ``grow_mm``."""
    liver = np.asarray(liver, dtype=bool)
    if liver.ndim != 3 or liver.shape != np.shape(prob) or liver.shape != np.shape(hu) or len(spacing) != 3:
        raise ValueError(f"liver, prob and hu must be (H, W, D) of one shape with 3 spacings, got {liver.shape}, "
                         f"{np.shape(prob)}, {np.shape(hu)} and {tuple(spacing)}")
    values = {"band_mm": band_mm, "remove_z": remove_z, "grow_mm": grow_mm, "grow_z": grow_z, "grow_prob": grow_prob}
    bad = {k: v for k, v in values.items() if not (np.isfinite(v) and v >= 0)}
    if bad or grow_prob > 1:
        raise ValueError(f"the refinement's settings must be finite and >= 0 (grow_prob at most 1), got "
                         f"{bad or {'grow_prob': grow_prob}}")
    sp = [float(s) for s in spacing]
    box = bounding_box(liver, margin=[int(np.ceil(grow_mm / s)) + 1 for s in sp])
    if box is None:
        return liver.copy()
    mask, p, h = liver[box], np.asarray(prob[box], dtype=np.float32), np.asarray(hu[box], dtype=np.float32)
    depth = depth_mm(mask, sp)
    stats = parenchyma_hu(mask, p, h, sp, depth=depth)
    if stats is None:
        log.info("liver refinement skipped: fewer than %d reference voxels", PARENCHYMA_MIN_VOXELS)
        return liver.copy()
    median, sd = stats
    z = np.abs(h - median) / sd
    remove = mask & (depth <= band_mm) & (z > remove_z)
    grow = ~mask & near_liver(mask, sp, grow_mm) & (z <= grow_z) & (p >= np.float32(grow_prob))
    out = np.zeros_like(liver)
    out[box] = fill_holes(largest_component((mask & ~remove) | grow))
    log.info("liver refinement: parenchyma %.0f +- %.0f HU; %d voxels removed, %d added", median, sd,
             int(remove.sum()), int(grow.sum()))
    return out


def opening(mask: np.ndarray, spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """Morphological opening of ``mask`` (bool (H, W, D)) with a ball of ``radius_mm`` in mm, by
    two Euclidean distance transforms (exact for a ball, and fast for radii of many voxels):
    the erosion keeps voxels farther than the radius from the background (outside the array is
    background), the dilation of that takes back every voxel within the radius of it."""
    eroded = depth_mm(mask, spacing) > radius_mm
    if not eroded.any():
        return eroded
    return ndimage.distance_transform_edt(~eroded, sampling=[float(s) for s in spacing]) <= radius_mm


def depth_mm(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """float (H, W, D): each voxel of ``mask`` (bool (H, W, D)) its Euclidean distance in mm
    (spacing (row, col, slice)) to the nearest background voxel, outside the array counted as
    background; 0 off the mask."""
    return ndimage.distance_transform_edt(np.pad(mask, 1), sampling=[float(s) for s in spacing])[1:-1, 1:-1, 1:-1]


def near_liver(liver: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """bool (H, W, D): the voxels whose centre lies within ``margin_mm`` mm of a liver voxel's
    centre (the liver itself included); the Euclidean distance in mm is computed only on the
    liver's bounding box widened by the margin, so a whole scan costs little."""
    liver = np.asarray(liver, dtype=bool)
    if liver.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"liver must be (H, W, D) with 3 spacings, got {liver.shape} and {tuple(spacing)}")
    if margin_mm < 0:
        raise ValueError(f"margin must be >= 0 mm, got {margin_mm}")
    if margin_mm == 0 or not liver.any():
        return liver.copy()
    box = bounding_box(liver, margin=[int(np.ceil(margin_mm / float(s))) for s in spacing])
    dist = ndimage.distance_transform_edt(~liver[box], sampling=[float(s) for s in spacing])
    out = np.zeros_like(liver)
    out[box] = dist <= margin_mm
    return out


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume in mL of a mask (H, W, D) with voxel spacing (row, col, slice) in mm."""
    return float(np.count_nonzero(mask)) * float(np.prod([float(s) for s in spacing])) / 1000.0


@dataclass(frozen=True, eq=False)  # array fields: no element-wise __eq__
class LiverSegmentation:
    """:func:`segment_liver`'s result: ``mask`` the liver (bool (H, W, D)), ``model_mask`` the
    model's liver before the intensity refinement (the same array when there was none), the
    seconds each step took, and ``prob`` the model's liver probabilities (H, W, D) they came from."""
    mask: np.ndarray
    model_mask: np.ndarray
    model_seconds: float
    refine_seconds: float
    prob: np.ndarray


def segment_liver(predictor: Predictor, hu: np.ndarray, spacing: Sequence[float], *, name: str = "scan",
                  batch_size: int = 8, opening_mm: float = DEFAULT_OPENING_MM,
                  refine: bool = True) -> LiverSegmentation:
    """The liver of a scan ``hu`` (H, W, D) in HU (spacing (row, col, slice) mm) with a liver
    model's :class:`inference.predictor.Predictor` (its HU window and resampling, the whole scan),
    then :func:`liver_from_probabilities` with an opening of ``opening_mm`` and, with ``refine``,
    :func:`refine_by_intensity`."""
    t0 = time.perf_counter()
    pred = predictor.predict_scan(hu, spacing, None, name=name, batch_size=batch_size)
    model_mask = liver_from_probabilities(pred.prob, predictor.threshold, spacing, opening_mm)
    t1 = time.perf_counter()
    liver = refine_by_intensity(model_mask, pred.prob, hu, spacing) if refine else model_mask
    t2 = time.perf_counter()
    if not liver.any():
        log.warning("%s: the liver model found no liver", name)
    else:
        log.info("%s: liver model: %.0f mL in slices %d-%d", name, volume_ml(liver, spacing),
                 *(lambda z: (int(z[0]), int(z[-1])))(np.flatnonzero(liver.any(axis=(0, 1)))))
    return LiverSegmentation(liver, model_mask, t1 - t0, t2 - t1, pred.prob)


def liver_warnings(liver: np.ndarray, spacing: Sequence[float], case: str, *, check_volume: bool = True) -> list[str]:
    """One-line warnings about a liver mask bool (H, W, D) (spacing (row, col, slice) mm) of scan
    ``case``; empty when there is nothing to check. A liver whose cross-section in the scan's
    first or last slice is at least :data:`CUT_OFF_AREA` of its largest is cut off by the scan's
    extent, so the vessel statistics describe part of it (any mask);
    with ``check_volume`` (a model's liver), a volume outside :data:`PLAUSIBLE_LIVER_ML`. An
    empty mask gives no warning here (the caller says that the model found no liver)."""
    liver = np.asarray(liver, dtype=bool)
    if liver.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"liver must be (H, W, D) with 3 spacings, got {liver.shape} and {tuple(spacing)}")
    out: list[str] = []
    area = liver.sum(axis=(0, 1))
    if not area.any():
        return out
    ends = [(name, area[k] / area.max()) for name, k in (("first", 0), ("last", liver.shape[2] - 1))
            if area[k] >= CUT_OFF_AREA * area.max()]
    if ends:
        shares = " and ".join(f"{100 * share:.0f}%" for _, share in ends)
        out.append(f"{case}: the liver reaches the scan's {' and '.join(name for name, _ in ends)} slice "
                   f"({shares} of its largest cross-section): the scan may not hold the whole liver, and the "
                   f"vessel statistics would describe part of it")
    ml = volume_ml(liver, spacing)
    lo, hi = PLAUSIBLE_LIVER_ML
    if check_volume and not lo <= ml <= hi:
        out.append(f"{case}: the liver model's liver holds {ml:.0f} mL, outside the {lo:.0f}-{hi:.0f} mL of "
                   f"adult livers: check {case}_liver.nii.gz before the vessel statistics")
    return out


def embed_liver_model(model: str | os.PathLike, liver_model: str | os.PathLike, out: str | os.PathLike, *,
                      overwrite: bool = False) -> Path:
    """Write ``out``: the vessel model file ``model`` with the liver model file ``liver_model``
    embedded (key :data:`EMBED_KEY`), so ``predict.py --model out`` segments the liver without
    ``--liver_model``. Both files are checked for their target first (ValueError naming the
    file); ``out`` is written atomically and an existing one is replaced only with ``overwrite``.
    The vessel model's own weights and settings are unchanged."""
    model, liver_model, out = Path(model), Path(liver_model), Path(out)
    vessel = load_checkpoint(model)
    check_target(vessel, str(model), "vessels")
    liver = load_checkpoint(liver_model)
    check_target(liver, str(liver_model), "liver")
    if vessel.get(EMBED_KEY):
        log.info("%s: replacing its embedded liver model (%s)", model, vessel[EMBED_KEY].get("source"))
    # the vessel model it was made from: tree models' branch networks name the masks they learnt by it
    vessel["vessel_model_sha256"] = vessel.get("vessel_model_sha256") or file_sha256(model)
    vessel[EMBED_KEY] = {"sha256": file_sha256(liver_model), "source": liver_model.name,
                         "checkpoint": {k: (None if k in _TRAINING_STATE else v) for k, v in liver.items()}}
    with atomic_path(out, overwrite=overwrite) as tmp:
        torch.save(vessel, tmp)
    return out


def embedded_liver_model(ckpt: dict, path: str | os.PathLike, device: str = "auto") -> Optional[Predictor]:
    """The :class:`inference.predictor.Predictor` of the liver model embedded in the vessel
    checkpoint ``ckpt`` (read from ``path``), or None when it embeds none. ValueError naming
    ``path`` when the embedded entry is not a liver model checkpoint."""
    entry = (ckpt or {}).get(EMBED_KEY)
    if not entry:
        return None
    inner = entry.get("checkpoint") if isinstance(entry, dict) else None
    if not isinstance(inner, dict) or inner.get("format") != FORMAT:
        raise ValueError(f"{path}: its embedded liver model is not a {FORMAT} checkpoint")
    label = f"{path}#{EMBED_KEY}({entry.get('source')})"
    check_target(inner, label, "liver")
    return Predictor.from_checkpoint_dict(inner, label, device, sha256=str(entry.get("sha256") or ""))
