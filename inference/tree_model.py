"""A tree model: which tree, portal vein or hepatic veins, each voxel of a vessel mask belongs to.

Which tree a vessel belongs to is a 3-D question: where it connects, towards the hilum or towards
the vena cava. A 2-D two-tree model (``main.py --classes portal,hepatic``) sees one slice and,
within CPU budgets, gave every vessel to the more frequent tree (docs/RESULTS.md, "Two trees").
A tree model instead sees the whole vessel mask of a scan at once, coarsely:

- input (2, h, w, d): the image (HU window of :data:`utils.h5io.HU_WINDOW`, in [0, 1]) and the
  vessel mask (the union of the trees, from any binary model, or the truth in training), both
  averaged over each ``grid_mm`` millimetre voxel (``coarse_rule`` "area": the mask becomes a
  vessel fraction, and a vessel thinner than a voxel stays in it wherever it lies; files from
  before the rule sampled the fine grid linearly, "sample", where a 1-voxel vessel could vanish)
  on the mask's bounding box widened by ``context_mm``;
- a small 3-D U-Net (the registry's ``unet3d``) with two outputs, the portal and the hepatic logit;
- on the full grid: the difference of the two logits, resampled back (linear), decides the
  voxels of the mask (> 0: hepatic), through a minimum cut (:func:`inference.trees.cut_trees`):
  the coarse grid smears the decision across the places where the two trees touch, and the cut
  moves the boundary to where the mask is narrow, so a stretch of vessel takes one tree
  (``smoothness`` 0: voxel by voxel). The one-tree-per-piece step of
  :func:`inference.trees.consistent_trees`, made for a 2-D model's slice-by-slice decisions, is
  not used: it hands whole parts of a tree to the other where both trees touch in one connected
  piece, as they do in a predicted mask.

A tree model file may also hold branch networks (``train_branch_model.py``,
:mod:`inference.branch_graph`): then the logit given to the cut is theirs, one value per branch
of the mask's skeleton, decided from the network's logit over each branch, its shape and place,
and its neighbours'.

Training (:func:`train_tree_model`) uses the true union as the mask and a loss only where there
are vessels: binary cross-entropy of the logit difference against each coarse voxel's hepatic
share of its vessel, weighted by its vessel fraction. A random shift of the volume within the
padded grid and a random contrast / level change are the augmentations; no flips or rotations
(the trees' roots, the hilum and the vena cava, are where they are).

Arrays are (H, W, D) (rows, columns, slices); spacing (row, col, slice) in mm.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from inference.branch_graph import BranchModel
from inference.trees import TREE_SMOOTHNESS, cut_trees
from networks.registry import build_model
from utils.atomic import atomic_path
from utils.boxes import bounding_box
from utils.h5io import HU_WINDOW
from utils.provenance import file_sha256
from utils.torch_io import load_torch_file

log = logging.getLogger("trees")

FORMAT = "livervessel-tree-model-v1"
#: the label values of the output: 1 portal vein, 2 hepatic veins (as a two-tree model's)
CLASSES = ("portal", "hepatic")
COARSE_RULES = ("area", "sample")


@dataclass
class TreeModelConfig:
    """How a tree model is built and trained; saved in its file."""

    grid_mm: float = 3.0
    context_mm: float = 30.0
    base_channels: int = 8
    depth: int = 4
    iterations: int = 800
    lr: float = 3e-3
    max_shift_voxels: int = 6
    seed: int = 0
    #: "area": each coarse voxel averages the fine voxels it covers; "sample": linear sampling (files
    #: written before the rule existed, read as such)
    coarse_rule: str = "area"

    def __post_init__(self) -> None:
        if self.coarse_rule not in COARSE_RULES:
            raise ValueError(f"coarse_rule must be one of {COARSE_RULES}, got {self.coarse_rule!r}")
        if self.grid_mm <= 0 or self.context_mm < 0:
            raise ValueError(f"grid_mm must be > 0 and context_mm >= 0, got {self.grid_mm}, {self.context_mm}")
        if self.iterations < 1 or self.depth < 1 or self.base_channels < 1:
            raise ValueError("iterations, depth and base_channels must be >= 1")


def check_binary(tree_model: str | os.PathLike, model: str | os.PathLike, classes: Optional[Sequence[str]]) -> None:
    """ValueError naming both files when the vessel model ``model`` already has ``classes``: a
    tree model labels a binary model's mask."""
    if classes:
        raise ValueError(f"{tree_model}: a tree model labels a binary model's mask, but {model} already has the "
                         f"classes {list(classes)}")


def vessel_model_warning(tree_model: "TreeModel", vessel_sha256: str, vessel_ckpt: dict) -> Optional[str]:
    """A warning when ``tree_model``'s branch networks learnt the masks of other binary models than
    the vessel model file of sha256 ``vessel_sha256`` and checkpoint ``vessel_ckpt`` (they learn how
    a model breaks and joins vessels; a file with an embedded liver model names the vessel model
    it was made from); None without branch networks or when the tree model's file does not say."""
    if tree_model.branches is None:
        return None
    learnt = [s for s in (tree_model.info.get("branches") or {}).get("vessel_model_sha256") or [] if s]
    if not learnt or {vessel_sha256, vessel_ckpt.get("vessel_model_sha256")} & set(learnt):
        return None
    return (f"{tree_model.path}: its branch networks learnt the masks of vessel model(s) "
            f"{', '.join(s[:12] for s in learnt)}, not of this one ({vessel_sha256[:12]}); train them on its masks "
            f"(train_tree_model.sh with VESSEL_MODEL) for the labels they were made for")


def build_tree_network(cfg: TreeModelConfig) -> nn.Module:
    """The tree model's network: ``unet3d``, 2 inputs (image, vessel mask), 2 logits (portal, hepatic)."""
    return build_model("unet3d", 2, len(CLASSES), base_channels=cfg.base_channels, depth=cfg.depth)


def _check(image: np.ndarray, union: np.ndarray, spacing: Sequence[float]) -> None:
    if np.ndim(image) != 3 or np.shape(union) != np.shape(image) or len(spacing) != 3:
        raise ValueError(f"image and vessel mask must be (H, W, D) of one shape with 3 spacings, got "
                         f"{np.shape(image)}, {np.shape(union)} and {tuple(spacing)}")


def context_box(union: np.ndarray, spacing: Sequence[float], context_mm: float) -> Optional[tuple[slice, ...]]:
    """The bounding box of ``union`` widened by ``context_mm`` on every side (clipped to the
    array), or None for an empty mask."""
    return bounding_box(union, margin=[int(np.ceil(context_mm / float(s))) for s in spacing])


def coarse(a: np.ndarray, spacing: Sequence[float], grid_mm: float, rule: str = "area") -> np.ndarray:
    """``a`` (H, W, D) at ``grid_mm`` mm per voxel, float32: with ``rule`` "area", first averaged
    over a box of round(grid_mm / spacing) fine voxels per axis (the coarse voxel's extent), then
    resampled linearly; with "sample", resampled linearly only (a structure thinner than the
    coarse voxel is seen or missed depending on where it lies)."""
    if rule not in COARSE_RULES:
        raise ValueError(f"coarse rule must be one of {COARSE_RULES}, got {rule!r}")
    a = np.asarray(a, dtype=np.float32)
    if rule == "area":
        size = [max(1, int(round(grid_mm / float(s)))) for s in spacing]
        if max(size) > 1:
            a = ndimage.uniform_filter(a, size=size, mode="nearest")
    zoom = [float(s) / grid_mm for s in spacing]
    return ndimage.zoom(a, zoom, order=1, grid_mode=True, mode="nearest")


def _pad(a: np.ndarray, multiple: int, extra: int = 0, minimum: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Zero-pad the last three axes of ``a`` at their end to a multiple of ``multiple`` with at
    least ``extra`` more voxels and at least ``minimum`` in all; returns the padded array and the
    original spatial shape."""
    shape = a.shape[-3:]
    target = [max(int(np.ceil((n + extra) / multiple) * multiple), minimum) for n in shape]
    pad = [(0, 0)] * (a.ndim - 3) + [(0, t - n) for t, n in zip(target, shape)]
    return np.pad(a, pad), tuple(shape)


def network_padding(depth: int) -> tuple[int, int]:
    """(multiple, minimum) of the coarse grid's padded axes for a U-Net of ``depth``: it halves an
    axis ``depth`` times, so an axis of 2**(depth - 1) would reach 0 and a grid of 16 or 24 on
    every axis would leave one voxel for the bottleneck's normalisation; 2**(depth + 1) keeps two."""
    return 2 ** (depth - 1), 2 ** (depth + 1)


def coarse_inputs(image: np.ndarray, union: np.ndarray, spacing: Sequence[float], grid_mm: float,
                  rule: str = "area") -> np.ndarray:
    """The network input (2, h, w, d) float32: image and vessel fraction at ``grid_mm`` (:func:`coarse`)."""
    return np.stack([coarse(image, spacing, grid_mm, rule), coarse(union, spacing, grid_mm, rule)])


def coarse_targets(labels: np.ndarray, spacing: Sequence[float], grid_mm: float, rule: str = "area") -> np.ndarray:
    """The training target (2, h, w, d) float32: each coarse voxel's portal and hepatic fractions
    of a label map (1 portal, 2 hepatic)."""
    return np.stack([coarse(labels == k + 1, spacing, grid_mm, rule) for k in range(len(CLASSES))])


def tree_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of hepatic minus portal logit against the hepatic share of the vessel,
    weighted by the vessel fraction (portal + hepatic); logits and target (B, 2, h, w, d)."""
    if logits.shape != target.shape or logits.ndim != 5 or logits.shape[1] != len(CLASSES):
        raise ValueError(f"logits and target must be (B, 2, h, w, d) alike, got {tuple(logits.shape)}, "
                         f"{tuple(target.shape)}")
    weight = target.sum(1)
    hepatic_share = target[:, 1] / weight.clamp_min(1e-6)
    per_voxel = F.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], hepatic_share, reduction="none")
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1e-6)


@dataclass
class TreeCase:
    """One training case: the image in [0, 1], the label map (1 portal, 2 hepatic), spacing mm."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]


@dataclass
class TreeModel:
    """A trained tree model: its network (eval mode), configuration and file hash."""

    network: nn.Module
    config: TreeModelConfig
    sha256: str = ""
    path: str = ""
    info: dict = field(default_factory=dict)
    #: branch networks (inference.branch_graph), when the file has them: their logit, per branch of
    #: the mask's skeleton, replaces the network's before the cut
    branches: Optional["BranchModel"] = None

    @property
    def classes(self) -> list[str]:
        return list(CLASSES)

    def trained_on(self, root: str | os.PathLike, dataset: str, cases: Sequence[str]) -> list[str]:
        """Which of ``cases`` of the preprocessed data ``<root>/<dataset>`` the network was trained on,
        as ``<dataset>/<case>`` (train_tree_model.py's ``info``: the cases so named, from the
        ``(root, dataset, lists)`` of ``info["data"]``); sorted."""
        here = (Path(root).resolve(), dataset)
        if not any((Path(r).resolve(), d) == here for r, d, *_ in self.info.get("data") or []):
            return []
        return sorted(set(self.info.get("cases") or []) & {f"{dataset}/{c}" for c in cases})

    def hepatic_minus_portal(self, image: np.ndarray, union: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """float32 (H, W, D): the hepatic minus the portal logit, on the full grid: the network's
        (0 outside the mask's context box), or with :attr:`branches` theirs, one value per
        branch of the mask's skeleton (0 outside the mask)."""
        logit = self.network_logit(image, union, spacing)
        if self.branches is None:
            return logit
        return self.branches.voxel_logit(union, logit, spacing)

    def network_logit(self, image: np.ndarray, union: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """float32 (H, W, D): the 3-D network's hepatic minus portal logit, on the full grid; 0
        outside the mask's context box."""
        _check(image, union, spacing)
        union = np.asarray(union, dtype=bool)
        out = np.zeros(union.shape, dtype=np.float32)
        box = context_box(union, spacing, self.config.context_mm)
        if box is None:
            return out
        multiple, minimum = network_padding(self.config.depth)
        x, shape = _pad(coarse_inputs(image[box], union[box], spacing, self.config.grid_mm, self.config.coarse_rule),
                        multiple, minimum=minimum)
        device = next(self.network.parameters()).device
        with torch.no_grad():
            logits = self.network(torch.from_numpy(x)[None].to(device))[0].float().cpu().numpy()
        diff = logits[1, :shape[0], :shape[1], :shape[2]] - logits[0, :shape[0], :shape[1], :shape[2]]
        sub = out[box]
        zoom = [n / m for n, m in zip(sub.shape, diff.shape)]
        full = ndimage.zoom(diff, zoom, order=1, grid_mode=True, mode="nearest")
        out[box] = full[:sub.shape[0], :sub.shape[1], :sub.shape[2]]
        return out

    def classify(self, image: np.ndarray, union: np.ndarray, spacing: Sequence[float],
                 smoothness: float = TREE_SMOOTHNESS) -> np.ndarray:
        """Label map uint8 (H, W, D) of the vessel mask ``union``: 1 portal, 2 hepatic, 0 elsewhere;
        the logit's minimum cut with ``smoothness`` (:func:`inference.trees.cut_trees`; 0: its sign
        voxel by voxel)."""
        union = np.asarray(union, dtype=bool)
        return cut_trees(union, self.hepatic_minus_portal(image, union, spacing), spacing, smoothness)

    def classify_both(self, image: np.ndarray, union: np.ndarray, spacing: Sequence[float],
                      smoothness: float = TREE_SMOOTHNESS) -> tuple[np.ndarray, np.ndarray]:
        """(voxel by voxel, cut): the label maps of :meth:`classify` with smoothness 0 and with
        ``smoothness``, from one run of the network."""
        union = np.asarray(union, dtype=bool)
        logit = self.hepatic_minus_portal(image, union, spacing)
        return cut_trees(union, logit, spacing, 0.0), cut_trees(union, logit, spacing, smoothness)


def shift_zero_fill(a: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """``a`` (C, h, w, d) moved by ``shift`` voxels along its last three axes, zero where nothing
    moved in: unlike ``np.roll``, the planes moved out at one end do not come back at the other
    (a vessel above the liver would reappear below it, in the wrong tree's place)."""
    out = np.zeros_like(a)
    src, dst = [slice(None)], [slice(None)]
    for s, n in zip(shift, a.shape[1:]):
        s = int(s)
        if abs(s) >= n:
            return out
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    x = x.copy()
    x[0] = x[0] * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
    if max_shift:
        shift = tuple(int(s) for s in rng.integers(-max_shift, max_shift + 1, 3))
        x, y = shift_zero_fill(x, shift), shift_zero_fill(y, shift)
    return x, y


def prepare_case(case: TreeCase, cfg: TreeModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of a training case on its padded coarse grid: the true union's context box,
    as at inference, with room for the shifts."""
    union = case.labels > 0
    box = context_box(union, case.spacing, cfg.context_mm)
    if box is None:
        raise ValueError(f"{case.name}: no vessel in the label map")
    x = coarse_inputs(case.image[box], union[box], case.spacing, cfg.grid_mm, cfg.coarse_rule)
    y = coarse_targets(case.labels[box], case.spacing, cfg.grid_mm, cfg.coarse_rule)
    multiple, minimum = network_padding(cfg.depth)
    return (_pad(x, multiple, cfg.max_shift_voxels, minimum)[0], _pad(y, multiple, cfg.max_shift_voxels, minimum)[0])


def train_tree_model(cases: Sequence[TreeCase], cfg: TreeModelConfig, device: str = "cpu",
                     progress: bool = True) -> tuple[TreeModel, list[float]]:
    """Train a tree model on ``cases`` (one whole case per step, in a seeded random order) for
    ``cfg.iterations`` steps of AdamW with the poly schedule; returns the model and the losses."""
    from tqdm import tqdm

    if not cases:
        raise ValueError("no training case")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = [prepare_case(c, cfg) for c in cases]
    net = build_tree_network(cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 - it / cfg.iterations) ** 0.9)
    losses: list[float] = []
    net.train()
    bar = tqdm(range(cfg.iterations), desc="tree model", disable=not progress)
    for _ in bar:
        x, y = data[int(rng.integers(len(data)))]
        x, y = _augment(x, y, rng, cfg.max_shift_voxels)
        logits = net(torch.from_numpy(x)[None].to(device))
        loss = tree_loss(logits, torch.from_numpy(y)[None].to(device))
        if not torch.isfinite(loss):
            raise RuntimeError(f"tree model: loss is {loss.item()} at step {len(losses) + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.item()))
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    net.eval()
    return TreeModel(net, cfg), losses


def save_tree_model(path: str | os.PathLike, model: TreeModel, info: dict, overwrite: bool = False) -> Path:
    """Write the tree model file (format, config, the network's weights, ``info``: what it was
    trained on), atomically; an existing file is kept unless ``overwrite``."""
    state = {k: v.detach().cpu() for k, v in model.network.state_dict().items()}
    doc = {"format": FORMAT, "classes": list(CLASSES), "hu_window": list(HU_WINDOW),
           "config": asdict(model.config), "state_dict": state, "info": info}
    if model.branches is not None:
        doc["branches"] = model.branches.state()
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(doc, tmp)
    return Path(path)


def load_tree_model(path: str | os.PathLike, device: str = "cpu") -> TreeModel:
    """Read a tree model file; ValueError naming the file when it is not one or does not fit."""
    path = Path(path)
    doc = load_torch_file(path, "tree model")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tree model (format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                         f"want {FORMAT!r}; train one with train_tree_model.py)")
    if tuple(doc.get("classes") or CLASSES) != CLASSES:
        raise ValueError(f"{path}: labels the trees {doc['classes']}, the code writes {list(CLASSES)} (1, 2)")
    if tuple(doc["hu_window"]) != tuple(HU_WINDOW):
        raise ValueError(f"{path}: trained on HU window {doc['hu_window']}, the code windows to {list(HU_WINDOW)}")
    # files from before the coarse rule sampled the fine grid: their networks learnt that input
    cfg = TreeModelConfig(**{"coarse_rule": "sample", **doc["config"]})
    net = build_tree_network(cfg)
    try:
        net.load_state_dict(doc["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit its configuration ({str(e).splitlines()[0]})") from None
    net.to(device).eval()
    branches = BranchModel.from_state(doc["branches"], str(path)) if "branches" in doc else None
    return TreeModel(net, cfg, file_sha256(path), str(path), doc.get("info", {}), branches)
