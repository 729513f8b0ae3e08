"""Synthetic 3D-IRCADb-style CT patients with known liver vessel trees (docs/DESIGN.md section 5).

Conventions: arrays are (H, W, D) = (rows, columns, slices); spacing and every position
are in mm in (row, column, slice) order, with voxel ``(i, j, k)`` centred at
``(i * spacing[0], j * spacing[1], k * spacing[2])``. Rows run anterior -> posterior,
columns patient right -> left, slices inferior -> superior.

What one patient holds (calibrated on the real patients of ``../shared/real`` with
``bench/phantom_stats.py``, which measures both with the same code):

* a body (air -1000 HU outside, subcutaneous fat ~-100, a muscle wall; inside it bowel loops
  in visceral fat, some with oral contrast (180-260 HU) or gas), and outside the liver the
  structures that cause false positives on real CT: aorta, inferior vena cava, spine with a
  cortical rim up to ~1000 HU, ribs, both kidneys (enhancing cortex), spleen, pancreas, a
  stomach with a gas cap. ``full`` shows the whole abdomen; ``demo`` and ``tiny`` a window on
  the liver and its medial neighbours (spine, aorta, IVC, right kidney, stomach, bowel);
* a liver (~106-126 HU) with low-frequency texture (features ~14 and ~4 mm), 0-3 hypodense
  tumours;
* a portal-vein tree and a hepatic-vein tree (the label, ``portalvein`` and
  ``venoussystem``) and a small hepatic-artery tree (``artery``), each grown by
  recursive branching with Murray's law radii (r_parent^3 = r_1^3 + r_2^3) between
  0.6 and 7 mm (twigs end at 0.72-1.1 mm), nearly straight branches whose length grows
  with their calibre (4 + 1.5 r mm), kept inside the liver and away from each other and
  from tumours; grown thickest first (10 % jitter) until the lumen fills ~4 % of the liver;
* portal-venous-phase enhancement (34-76 HU over the parenchyma, x1.1 in ``full``; in trunks thicker than
  3.5-4 mm it falls to x0-0.35, inflow of unenhanced blood; varying smoothly in space);
  partial volume: a fractional vessel occupancy times the enhancement is added to the
  tissue and the image is blurred with the scanner PSF (sigma 0.78 mm in-plane, 1.04 mm
  through-plane), so thin vessels are faint; then noise correlated over about a voxel
  in-plane, wider along one axis than the other (slightly streaky), ~11 HU high-pass std at
  0.9 mm, more at finer pixels.

The label of a tree is every voxel whose centre lies within hypot(r, LABEL_RIM_MM) of its
centreline, r the local lumen radius (interpolated linearly along each segment): like a
3D-IRCADb annotator's, the label reaches into the PSF-blurred rim around the lumen (real
labels' outer voxel layer has 0.4 of their core's contrast). See :func:`rasterise_tree`.
Everything is drawn from ``np.random.default_rng([seed, index])``, so a patient does not
depend on how many were made or in which process.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from phantom.dicom_io import write_patient
from utils.atomic import atomic_dir, atomic_path

log = logging.getLogger(__name__)

PRESETS = ("demo", "full", "tiny")
LABEL_TREES = ("portalvein", "venoussystem")
TREE_NAMES = ("portalvein", "venoussystem", "artery")
CENTERLINES_FILE = "centerlines.json"
CENTERLINES_FORMAT = "phantom-centerlines-v2"  # v2: with label_rim_mm (v1: 0, the exact lumen)
CENTERLINES_FORMATS_READ = (CENTERLINES_FORMAT, "phantom-centerlines-v1")  # v1: no rim recorded, same trees
MANIFEST_FILE = "phantom_manifest.json"
PATIENT_PREFIX = "3Dircadb1."
R_MIN_MM, R_MAX_MM = 0.6, 7.0
# scanner PSF, Gaussian sigma (mm; row, col, slice): in-plane FWHM ~1.8 mm, slice profile ~2.4 mm
PSF_SIGMA_MM = (0.78, 0.78, 1.04)
# mean segment radius (mm) over which the trunks' enhancement falls from the full blood value
# to the trunk factor (inflow of unenhanced blood near the hilum and the caval confluence)
TRUNK_RAMP_MM = (3.5, 4.0)
# the label reaches hypot(r, LABEL_RIM_MM) from the centreline (mm): the blurred rim an
# annotator takes in (about the PSF's in-plane sigma); 0 labels the exact lumen
LABEL_RIM_MM = 0.7
MAX_LABEL_RIM_MM = 3.0
# scanner noise std (HU) at 0.9 mm pixels, drawn per patient, before its in-plane correlation
NOISE_HU = (10.0, 12.5)
# Positions and radii are rounded to this many decimals before rasterising, so the
# written JSON reproduces the label exactly.
_DECIMALS = 4


@dataclass
class Tree:
    """A centreline graph. ``positions`` (N, 3) mm (row, col, slice); ``radius`` (N,) mm;
    ``edges`` (E, 2) node indices, parent -> child (away from the root)."""

    name: str
    positions: np.ndarray
    radius: np.ndarray
    edges: np.ndarray

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "positions_mm": np.round(self.positions, _DECIMALS).tolist(),
            "radius_mm": np.round(self.radius, _DECIMALS).tolist(),
            "edges": self.edges.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Tree":
        return cls(
            name=d["name"],
            positions=np.asarray(d["positions_mm"], dtype=np.float64).reshape(-1, 3),
            radius=np.asarray(d["radius_mm"], dtype=np.float64),
            edges=np.asarray(d["edges"], dtype=np.int64).reshape(-1, 2),
        )


@dataclass
class PhantomPatient:
    """One synthetic patient.

    ``hu`` int16 (H, W, D) Hounsfield units; ``masks`` organ -> uint8 {0, 1} (H, W, D) with
    keys liver, portalvein, venoussystem, artery, livertumor01..; ``spacing`` mm (row, col,
    slice); ``trees`` name -> :class:`Tree`; ``unsigned_intercept``: written as uint16 with
    RescaleIntercept -1024 (a reader that forgets to rescale is caught).
    """

    index: int
    hu: np.ndarray
    masks: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    trees: dict[str, Tree]
    unsigned_intercept: bool
    preset: str = ""
    seed: int = 0
    info: dict = field(default_factory=dict)
    label_rim: float = LABEL_RIM_MM  # mm: the label reaches hypot(r, label_rim)


# ----------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class _Preset:
    name: str
    shape: tuple[int, int, int]          # (H, W, D); D drawn from depth_range when given
    spacing: tuple[float, float, float]  # fixed spacing, or None-like when drawn
    liver_centred: bool                  # field of view centred on the liver (else on the body)
    depth_range: Optional[tuple[int, int]] = None
    inplane_range: Optional[tuple[float, float]] = None
    slice_range: Optional[tuple[float, float]] = None
    # blood enhancement x this: each preset is calibrated on the real patients at its own grid
    # (bench/phantom_stats.py); at the same enhancement full shows 5-10% less contrast per
    # labelled voxel than demo, likely from its 1.6-2.0 mm slices (not its finer pixels:
    # resampled in-plane to 0.9 mm its contrast stays put)
    enhance_gain: float = 1.0


_PRESETS = {
    "tiny": _Preset("tiny", (64, 64, 16), (1.5, 1.5, 2.5), True),
    "demo": _Preset("demo", (192, 192, 48), (0.9, 0.9, 1.6), True),
    "full": _Preset("full", (512, 512, 0), (0.0, 0.0, 0.0), False,
                    depth_range=(100, 160), inplane_range=(0.57, 0.87), slice_range=(1.6, 2.0),
                    enhance_gain=1.1),
}


def _check_label_rim(label_rim: float) -> None:
    if not 0 <= label_rim <= MAX_LABEL_RIM_MM:
        raise ValueError(f"label_rim must be between 0 and {MAX_LABEL_RIM_MM:g} mm, got {label_rim}")


def _check_preset(preset: str) -> _Preset:
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    return _PRESETS[preset]


def _grid(preset: _Preset, rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if preset.depth_range is None:
        return preset.shape, preset.spacing
    d = int(rng.integers(preset.depth_range[0], preset.depth_range[1] + 1))
    sp = round(float(rng.uniform(*preset.inplane_range)), 3)
    st = round(float(rng.uniform(*preset.slice_range)), 2)
    return (preset.shape[0], preset.shape[1], d), (sp, sp, st)


# ----------------------------------------------------------------------------- helpers
def _smooth_field(shape: tuple[int, int, int], spacing, cell_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std low-frequency random field (H, W, D) float32, features ~cell_mm.

    Random values on a coarse lattice (every cell_mm), spread to the grid by separable
    Gaussian weights (sigma = cell_mm): three small matrix products, cheap even at 512^2.
    """
    out = rng.standard_normal(tuple(max(2, int(math.ceil(n * s / cell_mm)) + 3) for n, s in zip(shape, spacing)))
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        x = np.arange(n) * s
        xc = (np.arange(out.shape[axis]) - 1.5) * cell_mm
        w = np.exp(-0.5 * ((x[:, None] - xc[None, :]) / cell_mm) ** 2)
        w /= w.sum(1, keepdims=True)
        out = np.moveaxis(np.tensordot(w, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    out = out.astype(np.float32)
    out -= out.mean()
    out /= out.std() + 1e-6
    return out


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Bounding box of a non-empty boolean mask, grown by ``pad`` voxels (clipped)."""
    box = []
    for ax in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        box.append(slice(max(0, idx[0] - pad), min(mask.shape[ax], idx[-1] + 1 + pad)))
    return tuple(box)


def _ellipse2d(shape, spacing, centre, semi) -> np.ndarray:
    """Boolean (H, W) ellipse with centre / semi-axes in mm (row, col)."""
    r = (np.arange(shape[0], dtype=np.float32) * spacing[0] - centre[0]) / semi[0]
    c = (np.arange(shape[1], dtype=np.float32) * spacing[1] - centre[1]) / semi[1]
    return (r[:, None] ** 2 + c[None, :] ** 2) <= 1.0


def _ellipsoid_box(shape, spacing, centre, semi):
    """(slices, boolean mask) of an axis-aligned ellipsoid, evaluated only in its bounding box."""
    sl, ax = [], []
    for n, s, c, a in zip(shape, spacing, centre, semi):
        lo = max(0, int(math.floor((c - a) / s)))
        hi = min(n, int(math.ceil((c + a) / s)) + 1)
        if hi <= lo:
            return None, None
        sl.append(slice(lo, hi))
        ax.append((np.arange(lo, hi, dtype=np.float32) * s - c) / a)
    q = ax[0][:, None, None] ** 2 + ax[1][None, :, None] ** 2 + ax[2][None, None, :] ** 2
    return tuple(sl), q <= 1.0


# ----------------------------------------------------------------------------- rasterising
def _segment_box(p0, p1, reach, shape, spacing):
    lo = np.floor((np.minimum(p0, p1) - reach) / spacing).astype(int)
    hi = np.ceil((np.maximum(p0, p1) + reach) / spacing).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _segment_distance(box, p0, p1, r0, r1, spacing):
    """Distance (mm) from each voxel centre in ``box`` to segment p0-p1 and the local radius
    at the closest point (radius linear in the segment parameter)."""
    gr, gc, gs = (np.arange(b.start, b.stop, dtype=np.float64) * s - o for b, s, o in zip(box, spacing, p0))
    v = p1 - p0
    vv = float(v @ v)
    if vv > 0:
        t = (gr[:, None, None] * v[0] + gc[None, :, None] * v[1] + gs[None, None, :] * v[2]) / vv
        np.clip(t, 0.0, 1.0, out=t)
    else:
        t = np.zeros((len(gr), len(gc), len(gs)))
    dr = gr[:, None, None] - t * v[0]
    dc = gc[None, :, None] - t * v[1]
    ds = gs[None, None, :] - t * v[2]
    d = np.sqrt(dr * dr + dc * dc + ds * ds)
    return d, r0 + t * (r1 - r0)


def rasterise_tree(tree: Tree, shape: tuple[int, int, int], spacing, soft_width: Optional[float] = None,
                   edge_weight: Optional[np.ndarray] = None, label_rim: float = 0.0):
    """Label and fractional occupancy of a tree on the grid.

    Returns ``(label, occupancy)``: label uint8 (H, W, D), 1 where a voxel centre lies within
    hypot(r(t), ``label_rim``) of a centreline segment (r linear along the segment; rim 0:
    the lumen itself); occupancy float32 (H, W, D) in [0, 1], ``clip((r - d) / w + 1/2, 0, 1)``
    with w = ``soft_width`` mm (default: mean in-plane spacing), the fraction of a voxel
    of width w the vessel covers (partial volume before the PSF). With ``edge_weight``
    (E,) in [0, 1], a segment's occupancy is scaled by its weight (the maximum over
    segments is kept); the label does not depend on it.
    """
    if edge_weight is not None and len(edge_weight) != len(tree.edges):
        raise ValueError(f"edge_weight has {len(edge_weight)} values for {len(tree.edges)} edges")
    _check_label_rim(label_rim)
    spacing = np.asarray(spacing, dtype=np.float64)
    w = float(soft_width) if soft_width is not None else float(spacing[:2].mean())
    label = np.zeros(shape, dtype=bool)
    occ = np.zeros(shape, dtype=np.float32)
    for e, (a, b) in enumerate(tree.edges):
        p0, p1 = tree.positions[a], tree.positions[b]
        r0, r1 = float(tree.radius[a]), float(tree.radius[b])
        box = _segment_box(p0, p1, max(r0, r1) + max(w, label_rim), np.asarray(shape), spacing)
        if box is None:
            continue
        d, r = _segment_distance(box, p0, p1, r0, r1, spacing)
        label[box] |= d <= np.hypot(r, label_rim)
        o = np.clip((r - d) / w + 0.5, 0.0, 1.0).astype(np.float32)
        if edge_weight is not None:
            o *= np.float32(edge_weight[e])
        np.maximum(occ[box], o, out=occ[box])
    return label.astype(np.uint8), occ


# ----------------------------------------------------------------------------- tree growth
class _Space:
    """Where vessels may go: clearance (mm to the edge of the allowed region, from a coarse
    distance transform) and a coarse occupancy grid so branches keep apart."""

    CELL_MM = 4.0

    def __init__(self, allowed: np.ndarray, spacing, gap_mm: float):
        # gap_mm: wall-to-centreline distance a branch keeps from other subtrees
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.stride = np.maximum(1, np.round(1.5 / self.spacing)).astype(int)
        coarse = allowed[:: self.stride[0], :: self.stride[1], :: self.stride[2]]
        self.cstep = self.spacing * self.stride
        # the distance transform only where it matters: the allowed region's box, one zero
        # layer around it (everything outside is outside, so the result is the same)
        box = _bbox(coarse, 1) if coarse.any() else tuple(slice(0, 1) for _ in range(3))
        self.origin = np.array([b.start for b in box])
        self.clear = ndimage.distance_transform_edt(np.pad(coarse[box], 1), sampling=self.cstep)[1:-1, 1:-1, 1:-1]
        self.clear = self.clear.astype(np.float32)
        # error of a nearest-cell lookup
        self.slack = 0.5 * float(np.linalg.norm(self.cstep))
        extent = np.asarray(allowed.shape) * self.spacing
        self.owner = np.zeros(np.ceil(extent / self.CELL_MM).astype(int) + 1, dtype=np.int32)
        self.gap = float(gap_mm)

    def clearance(self, p: np.ndarray) -> float:
        c, n, o = self.cstep, self.clear.shape, self.origin
        i, j, k = int(round(p[0] / c[0])) - o[0], int(round(p[1] / c[1])) - o[1], int(round(p[2] / c[2])) - o[2]
        if not (0 <= i < n[0] and 0 <= j < n[1] and 0 <= k < n[2]):
            return -1.0
        return float(self.clear[i, j, k]) - self.slack

    _offsets: dict = {}

    def _cells(self, p0, p1, pad: float) -> tuple:
        n = max(2, int(np.linalg.norm(p1 - p0) / (0.5 * self.CELL_MM)) + 1)
        pts = p0[None] + np.linspace(0, 1, n)[:, None] * (p1 - p0)[None]
        base = np.floor(pts / self.CELL_MM).astype(np.int64)
        k = int(math.ceil(pad / self.CELL_MM))
        if k > 0:
            off = self._offsets.get((k, pad))
            if off is None:
                o = np.arange(-k, k + 1)
                off = np.stack(np.meshgrid(o, o, o, indexing="ij"), -1).reshape(-1, 3)
                near = (np.clip(np.abs(off) - 0.5, 0, None) ** 2).sum(1) * self.CELL_MM**2 <= pad**2
                off = self._offsets[(k, pad)] = off[near]
            base = (base[:, None, :] + off[None]).reshape(-1, 3)
        hi = np.asarray(self.owner.shape) - 1
        np.clip(base, 0, hi, out=base)
        return base[:, 0], base[:, 1], base[:, 2]

    def free(self, p0, p1, ok: set) -> bool:
        """True if the centreline p0-p1 crosses only free cells or cells owned by ``ok``."""
        c, n = self.CELL_MM, self.owner.shape
        m = max(2, int(math.dist(p0, p1) / (0.5 * c)) + 1)
        for i in range(m):
            t = i / (m - 1)
            idx = tuple(min(max(int((a + t * (b - a)) // c), 0), k - 1) for a, b, k in zip(p0, p1, n))
            o = int(self.owner[idx])
            if o and o not in ok:
                return False
        return True

    def claim(self, p0, p1, radius: float, owner: int) -> None:
        cells = self._cells(p0, p1, round(radius + self.gap, 1))
        cur = self.owner[cells]
        self.owner[cells] = np.where(cur == 0, owner, cur)


@dataclass
class _GrowParams:
    r_min: float          # no bifurcation below ~1.26 r_min (children would be thinner)
    len_a: float          # branch length = (len_a + len_b * r) * U(0.7, 1.3), mm
    len_b: float
    curvature: float      # direction jitter per mm of step
    margin: float         # mm kept between a vessel wall and the edge of the allowed region
    flow_split: tuple[float, float]  # flow fraction of the smaller child
    shared: bool = True   # claims and respects space in the shared occupancy grid
    max_nodes: int = 6000


def _unit(v):
    return v / (np.linalg.norm(v) + 1e-12)


def _perp(d, rng):
    """A random unit vector perpendicular to d."""
    return _unit(np.cross(d, rng.standard_normal(3)))


class _Forest:
    """Grows several trees at once, largest vessels first, in one shared space.

    Branch ids index a branch tree (``branch_parent``); every tree has a pseudo-branch
    as the parent of its roots. A branch may enter space claimed by itself, its sibling
    or its ancestors (it starts there), never by other subtrees: so subtrees of one tree
    and different trees keep ``gap_mm`` apart and fill the liver sparsely.
    """

    PRIORITY_JITTER = 0.1

    def __init__(self, space: _Space, rng: np.random.Generator):
        self.space, self.rng = space, rng
        self.trees: dict[str, dict] = {}
        self.heap: list = []
        self.counter = 0
        self.branch_parent: dict[int, int] = {0: 0}
        self.branch_children: dict[int, list[int]] = {0: []}
        self.next_branch = 1
        self.volume = 0.0

    def _node(self, tree: str, p, r) -> int:
        t = self.trees[tree]
        t["pos"].append(np.asarray(p, dtype=np.float64))
        t["rad"].append(float(r))
        return len(t["pos"]) - 1

    def add_root(self, tree: str, p, direction, r, params: _GrowParams) -> bool:
        if tree not in self.trees:
            # a pseudo-branch per tree makes the tree's roots siblings (they share the space)
            pseudo = self.next_branch
            self.next_branch += 1
            self.branch_parent[pseudo] = 0
            self.trees[tree] = {"pos": [], "rad": [], "edges": [], "params": params, "pseudo": pseudo}
        if self.space.clearance(np.asarray(p)) < r + params.margin:
            return False
        node = self._node(tree, p, r)
        self._push(tree, node, _unit(np.asarray(direction, float)), r, parent_branch=self.trees[tree]["pseudo"])
        return True

    def _push(self, tree, node, direction, r, parent_branch):
        bid = self.next_branch
        self.next_branch += 1
        self.branch_parent[bid] = parent_branch
        self.branch_children.setdefault(parent_branch, []).append(bid)
        self.counter += 1
        # thickest first, with a 10 % (lognormal) jitter: a volume budget then ends the tree
        # over a range of calibres, not at one
        priority = r * math.exp(self.PRIORITY_JITTER * self.rng.standard_normal())
        heapq.heappush(self.heap, (-priority, self.counter, tree, node, tuple(direction), r, bid))

    def grow(self, volume_budget: float = math.inf) -> None:
        """Grow until no branch can go on, or the shared trees' lumen volume (mm^3) reaches
        ``volume_budget``; thickest first, so a budget trims the thinnest twigs."""
        while self.heap:
            _, _, tree, node, direction, r, bid = heapq.heappop(self.heap)
            t = self.trees[tree]
            if len(t["pos"]) >= t["params"].max_nodes:
                continue
            if t["params"].shared and self.volume >= volume_budget:
                continue
            self._grow_branch(tree, node, np.asarray(direction), r, bid)

    def _step_ok(self, p0, p1, r, prm: _GrowParams, ok):
        sp = self.space
        if sp.clearance(p1) < r + prm.margin or sp.clearance(0.5 * (p0 + p1)) < r + prm.margin:
            return False
        return not prm.shared or sp.free(p0, p1, ok)

    def _grow_branch(self, tree, node, direction, r, bid):
        t = self.trees[tree]
        prm: _GrowParams = t["params"]
        rng, sp = self.rng, self.space
        length = (prm.len_a + prm.len_b * r) * rng.uniform(0.7, 1.3)
        step = float(np.clip(0.8 * r + 1.0, 1.5, 4.0))
        n_steps = max(1, int(round(length / step)))
        start = t["pos"][node]
        ok = {bid}
        b = self.branch_parent[bid]
        if b:
            ok.update(self.branch_children[b])
        while b:
            ok.add(b)
            b = self.branch_parent[b]
        p, d, cur = start, direction, node
        completed = True
        for _ in range(n_steps):
            accepted = False
            for attempt in range(10):
                jitter = prm.curvature * math.sqrt(step) * (1.0 + 0.6 * attempt)
                d_new = _unit(d + jitter * rng.standard_normal(3))
                p_new = p + step * d_new
                if self._step_ok(p, p_new, r, prm, ok):
                    accepted = True
                    break
            if not accepted:
                completed = False
                break
            if prm.shared:
                sp.claim(p, p_new, r, bid)
                self.volume += math.pi * r * r * step
            nxt = self._node(tree, p_new, r)
            t["edges"].append((cur, nxt))
            p, d, cur = p_new, d_new, nxt
        if cur == node:
            return
        if r < prm.r_min * 2 ** (1 / 3):
            return  # terminal: children would fall below r_min
        lo = max(prm.flow_split[0], (prm.r_min / r) ** 3)
        hi = prm.flow_split[1]
        if lo > hi:
            return
        f = rng.uniform(lo, hi)
        r_big, r_small = r * (1 - f) ** (1 / 3), r * f ** (1 / 3)
        # the thinner child turns more (minimum-work branching); a few planes are tried,
        # since a blocked branch's way on is often shut
        best_one = None
        for _ in range(6):
            a_big = math.radians(rng.uniform(8, 35) if completed else rng.uniform(25, 60))
            a_small = math.radians(rng.uniform(40, 80))
            e = _perp(d, rng)
            d_big = _unit(math.cos(a_big) * d + math.sin(a_big) * e)
            d_small = _unit(math.cos(a_small) * d - math.sin(a_small) * e)
            fits = [self._step_ok(p, p + (r_c + 2.0) * dc, r_c, prm, ok)
                    for dc, r_c in ((d_big, r_big), (d_small, r_small))]
            if fits[0] and fits[1]:
                self._push(tree, cur, d_big, r_big, bid)
                self._push(tree, cur, d_small, r_small, bid)
                return
            if best_one is None and (fits[0] or fits[1]):
                best_one = d_big if fits[0] else d_small
        if best_one is not None:
            # only one way is open: the vessel carries on, no bifurcation (Murray holds trivially)
            self._push(tree, cur, best_one, r, bid)

    def result(self) -> dict[str, Tree]:
        out = {}
        for name, t in self.trees.items():
            pos = np.round(np.asarray(t["pos"], dtype=np.float64).reshape(-1, 3), _DECIMALS)
            rad = np.round(np.asarray(t["rad"], dtype=np.float64), _DECIMALS)
            edges = np.asarray(t["edges"], dtype=np.int64).reshape(-1, 2)
            # a root whose first step was blocked is a lone node: dropped (nodes renumbered)
            used = np.zeros(len(pos), dtype=bool)
            used[edges.ravel()] = True
            new_index = np.cumsum(used) - 1
            out[name] = Tree(name, pos[used], rad[used], new_index[edges].reshape(-1, 2))
        return out


# ----------------------------------------------------------------------------- anatomy
def _liver_mask(shape, spacing, centre, semi, rng) -> np.ndarray:
    """A lobed liver: an ellipsoid whose left lobe (towards +col) thins, with a smooth
    random boundary; evaluated in its bounding box."""
    box, _ = _ellipsoid_box(shape, spacing, centre, np.asarray(semi) * 1.25)
    mask = np.zeros(shape, dtype=bool)
    if box is None:
        return mask
    ax = [(np.arange(b.start, b.stop, dtype=np.float32) * s - c) / a for b, s, c, a in zip(box, spacing, centre, semi)]
    qr, qc, qz = np.meshgrid(*ax, indexing="ij", sparse=True)
    taper = 1.0 - 0.45 * np.clip(qc + 0.1, 0, 1.2)           # thinner left lobe
    # slight dome: the superior surface is rounder than the inferior one
    qz2 = np.where(qz > 0, qz * 1.1, qz)
    rho2 = (qr / taper) ** 2 + qc**2 + (qz2 / taper) ** 2
    rho = np.sqrt(rho2)
    sub_shape = tuple(b.stop - b.start for b in box)
    bump = _smooth_field(sub_shape, spacing, 0.35 * float(np.mean(semi)), rng)
    mask[box] = rho <= 1.0 + 0.08 * bump
    return mask


@dataclass
class _Frame:
    """Where the anatomy sits in the grid: scales and centres in mm (row, col[, slice])."""

    s_in: float               # in-plane anatomy scale (1 = the reference adult abdomen)
    s_z: float                # through-plane scale of the liver
    body_c: np.ndarray        # (2,) body centre
    body_semi: np.ndarray     # (2,) body semi-axes
    liver_c: np.ndarray       # (3,) liver centre
    liver_semi: np.ndarray    # (3,) liver semi-axes

    def at(self, dr: float, dc: float) -> tuple[float, float]:
        """Body-frame offset (mm at scale 1) -> grid mm."""
        return (self.body_c[0] + dr * self.s_in, self.body_c[1] + dc * self.s_in)


def _frame(shape, spacing, preset: _Preset, rng: np.random.Generator) -> _Frame:
    """Scales and centres. A liver-centred field of view (demo, tiny) is a window on the
    liver and its medial neighbours (spine, aorta, IVC, kidney, stomach), shifted towards
    the body's midline; otherwise the whole abdomen is in view."""
    fov = np.asarray(shape) * np.asarray(spacing)
    s_in = (fov[1] / 190.0 if preset.liver_centred else fov[1] / 380.0) * rng.uniform(0.95, 1.05)
    # a whole-abdomen view shows the liver at its adult size next to the body (about half its width)
    liver_semi_ref = np.array([80.0, 78.0, 75.0]) * rng.uniform(0.92, 1.08, 3) * (1.0 if preset.liver_centred else 1.15)
    s_z = min(s_in, (0.55 if preset.liver_centred else 0.40) * fov[2] / liver_semi_ref[2])
    liver_semi = liver_semi_ref * np.array([s_in, s_in, s_z])
    liver_off = np.array([-5.0, -62.0]) * s_in                 # liver centre relative to the body centre
    if preset.liver_centred:
        # the window's centre lies 40 % of the way from the liver's centre to the body's
        liver_c = fov / 2 + rng.uniform(-3, 3, 3) * np.array([1, 1, 0.3]) + np.array([0.0, 0.4 * liver_off[1], 0.0])
        body_c = liver_c[:2] - liver_off
    else:
        body_c = fov[:2] / 2 + rng.uniform(-5, 5, 2)
        liver_c = np.array([body_c[0] + liver_off[0], body_c[1] + liver_off[1], fov[2] / 2 + rng.uniform(-8, 8)])
    body_semi = np.array([125.0, 165.0]) * s_in * rng.uniform(0.95, 1.05, 2)
    return _Frame(float(s_in), float(s_z), body_c, body_semi, liver_c, liver_semi)


def _body(shape, spacing, fr: _Frame, rng: np.random.Generator):
    """Air, subcutaneous fat, the muscle wall, and inside it visceral fat with bowel loops
    (some filled with oral contrast, some with gas). Returns (hu float32 (H, W, D), inner
    (H, W) bool: inside the muscle wall, wall radii (fat, muscle) mm)."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    fat_t, muscle_t = rng.uniform(12, 24) * fr.s_in, rng.uniform(6, 10) * fr.s_in
    body = _ellipse2d(shape, spacing, fr.body_c, fr.body_semi)
    inner_m = _ellipse2d(shape, spacing, fr.body_c, fr.body_semi - fat_t)
    inner = _ellipse2d(shape, spacing, fr.body_c, fr.body_semi - fat_t - muscle_t)
    hu[body] = -100.0
    hu[inner_m] = 50.0
    # bowel: loops where a smooth field is high, their wall (~40 HU) around a lumen that holds
    # fluid, oral contrast (bright, a common false positive) or gas
    loops = _smooth_field(shape, spacing, 18.0, rng)
    content = _smooth_field(shape, spacing, 30.0, rng)
    vis = np.full(shape, -90.0, dtype=np.float32)
    vis[loops > -0.3] = 40.0
    lumen = loops > 0.45
    vis[lumen] = np.where(content[lumen] > 0.5, rng.uniform(180, 260), np.where(content[lumen] < -1.2, -900.0, 15.0))
    hu = np.where(inner[:, :, None], vis, hu)
    return hu, inner, (fat_t, muscle_t)


def _put_ellipse(hu, clutter, shape, spacing, centre, semi, value, gap=2.0) -> np.ndarray:
    """Paint a (H, W) ellipse through all slices; ``clutter`` (what the liver gives way to)
    gets the ellipse grown by ``gap`` mm."""
    m = _ellipse2d(shape, spacing, centre, semi)
    hu[m] = value
    clutter[_ellipse2d(shape, spacing, centre, np.asarray(semi) + gap)] = True
    return m


def _put_ellipsoid(hu, clutter, shape, spacing, centre, semi, value) -> Optional[tuple]:
    box, m = _ellipsoid_box(shape, spacing, centre, semi)
    if box is None:
        return None
    sub = hu[box]
    sub[m] = value
    clutter[box] |= m
    return box, m


def _clutter(hu, shape, spacing, fr: _Frame, wall: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Bright and soft structures outside the liver, painted into ``hu``: back muscles, spine
    (cancellous core, cortical rim), aorta, IVC, ribs, both kidneys (enhancing cortex),
    spleen, pancreas, stomach with a gas cap. Returns the clutter mask (H, W, D) bool."""
    clutter = np.zeros(shape, dtype=bool)
    s_in, s_z, at = fr.s_in, fr.s_z, fr.at
    _put_ellipse(hu, clutter, shape, spacing, at(95, 5), (32 * s_in, 60 * s_in), 50.0, gap=0)
    vb_c, vb_r = at(80, 5), 19 * s_in
    _put_ellipse(hu, clutter, shape, spacing, vb_c, (vb_r, vb_r * 1.1), rng.uniform(750, 1000))
    hu[_ellipse2d(shape, spacing, vb_c, (vb_r - 2.5, vb_r * 1.1 - 2.5))] = rng.uniform(230, 320)
    _put_ellipse(hu, clutter, shape, spacing, at(108, 5), (9 * s_in, 14 * s_in), rng.uniform(600, 900))
    _put_ellipse(hu, clutter, shape, spacing, at(50, 18), (12 * s_in, 12 * s_in), rng.uniform(150, 200))   # aorta
    _put_ellipse(hu, clutter, shape, spacing, at(45, -28), (11 * s_in, 13 * s_in), rng.uniform(110, 150))  # IVC
    # ribs: bony ovals inside the wall on the right and front, present in bands of slices
    zz = np.arange(shape[2]) * spacing[2]
    fat_t, muscle_t = wall
    for ang in np.linspace(100, 260, 8) + rng.uniform(-6, 6):
        a = math.radians(ang)
        rr = fr.body_semi - fat_t - 0.5 * muscle_t
        c = (fr.body_c[0] + rr[0] * math.sin(a) * 0.95, fr.body_c[1] + rr[1] * math.cos(a) * 0.95)
        m2 = _ellipse2d(shape, spacing, c, (4 * s_in + 1, 7 * s_in + 1))
        period, phase = rng.uniform(25, 40), rng.uniform(0, 40)
        on = ((zz + phase) % period) < 0.45 * period
        hu[m2[:, :, None] & on[None, None, :]] = rng.uniform(350, 700)
        clutter |= m2[:, :, None] & on[None, None, :]
    zc, zs = fr.liver_c[2], fr.liver_semi[2]
    scale = np.array([s_in, s_in, s_z])
    for dr, dc, fz in ((55, -70, -0.75), (55, 75, -0.7)):       # kidneys: cortex, then medulla
        c = np.array([*at(dr, dc), zc + fz * zs])
        _put_ellipsoid(hu, clutter, shape, spacing, c, np.array([24, 28, 40]) * scale, rng.uniform(170, 220))
        _put_ellipsoid(hu, clutter, shape, spacing, c, np.array([14, 17, 28]) * scale, rng.uniform(90, 130))
    _put_ellipsoid(hu, clutter, shape, spacing, np.array([*at(30, 110), zc + 0.1 * zs]),
                   np.array([45, 35, 50]) * scale, rng.uniform(105, 130))                          # spleen
    _put_ellipsoid(hu, clutter, shape, spacing, np.array([*at(20, 20), zc - 0.5 * zs]),
                   np.array([12, 45, 25]) * scale, rng.uniform(90, 120))                           # pancreas
    sc = np.array([*at(-50, 60), zc + 0.2 * zs])
    got = _put_ellipsoid(hu, clutter, shape, spacing, sc, np.array([38, 42, 40]) * scale, 20.0)    # stomach
    if got is not None:
        box, m = got
        rows = np.arange(box[0].start, box[0].stop) * spacing[0]
        hu[box][m & (rows < sc[0] - 12 * s_in)[:, None, None]] = -950.0
    return clutter


def _liver(hu, shape, spacing, fr: _Frame, clutter, inner, rng: np.random.Generator):
    """The liver (largest piece of a lobed shape minus clutter, inside the wall) with its
    parenchyma: a mean HU and a low-frequency texture. Returns (liver bool, its bounding
    box, parenchyma mean HU, texture float32 (H, W, D))."""
    liver = _liver_mask(shape, spacing, fr.liver_c, fr.liver_semi, rng)
    liver &= ~clutter
    liver &= inner[:, :, None]
    lb = _bbox(liver, 2)
    sub = ndimage.binary_opening(liver[lb], iterations=1)
    lab, n = ndimage.label(sub)
    if n > 1:
        sizes = ndimage.sum_labels(sub, lab, index=np.arange(1, n + 1))
        sub = lab == (1 + int(np.argmax(sizes)))
    liver[:] = False
    liver[lb] = sub
    par_mean = rng.uniform(106, 126)
    texture = np.zeros(shape, dtype=np.float32)
    texture[lb] = (_smooth_field(sub.shape, spacing, 14.0, rng) * rng.uniform(6, 9)
                   + _smooth_field(sub.shape, spacing, 4.0, rng) * rng.uniform(3, 5))
    hu[liver] = par_mean + texture[liver]
    return liver, lb, float(par_mean), texture


def _tumours(hu, shape, spacing, fr: _Frame, liver, lb, par_mean, texture, rng: np.random.Generator):
    """0-3 hypodense tumours inside the liver, painted into ``hu``. Returns (masks, allowed):
    the tumour bool masks and the liver minus the tumours grown by 3 mm (where vessels may go)."""
    tumours = []
    stride = np.maximum(1, np.round(1.5 / np.asarray(spacing))).astype(int)
    coarse = np.pad(liver[lb][:: stride[0], :: stride[1], :: stride[2]], 1)
    edt = ndimage.distance_transform_edt(coarse, sampling=np.asarray(spacing) * stride)
    cand = np.argwhere(edt > 0)
    origin = np.array([b.start for b in lb])
    for _ in range(int(rng.integers(0, 4))):
        rad = rng.uniform(5, 16) * max(fr.s_in, 0.5)
        ok = cand[edt[tuple(cand.T)] > rad + 4.0]
        if len(ok) == 0:
            break
        c = ((ok[rng.integers(len(ok))] - 1) * stride + origin) * np.asarray(spacing)
        semi = rad * rng.uniform(0.8, 1.2, 3)
        box, m = _ellipsoid_box(shape, spacing, c, semi)
        tm = np.zeros(shape, dtype=bool)
        tm[box] = m
        tm &= liver
        if tm.sum() == 0:
            continue
        hu[tm] = par_mean - rng.uniform(35, 60) + 0.5 * texture[tm]
        tumours.append((tm, c, semi))
    allowed = liver.copy()
    for _, c, semi in tumours:
        box, m = _ellipsoid_box(shape, spacing, c, semi + 3.0)
        allowed[box] &= ~m
    return [t[0] for t in tumours], allowed


def _anatomy(shape, spacing, preset: _Preset, rng: np.random.Generator):
    """The patient without vessels, before PSF and noise.

    Returns ``(hu, liver, tumours, allowed, info)``: tissue HU float32 (H, W, D); liver
    bool (tumours included); list of tumour bool masks; ``allowed`` = liver minus the
    tumours grown by 3 mm (where vessels may go); info dict (parenchyma mean HU, scales,
    liver centre and semi-axes in mm).
    """
    spacing = tuple(float(s) for s in spacing)
    fr = _frame(shape, spacing, preset, rng)
    hu, inner, wall = _body(shape, spacing, fr, rng)
    clutter = _clutter(hu, shape, spacing, fr, wall, rng)
    liver, lb, par_mean, texture = _liver(hu, shape, spacing, fr, clutter, inner, rng)
    tumours, allowed = _tumours(hu, shape, spacing, fr, liver, lb, par_mean, texture, rng)
    info = {"parenchyma_mean_hu": par_mean, "anatomy_scale": [fr.s_in, fr.s_z],
            "liver_centre_mm": fr.liver_c.tolist(), "liver_semi_mm": fr.liver_semi.tolist()}
    return hu, liver, tumours, allowed, info


def _grow_vessels(allowed, liver_c, liver_semi, spacing, rng) -> dict[str, Tree]:
    # sizes follow the liver's (cm^3): the gap between subtrees and the root calibre
    liver_cm3 = float(allowed.sum()) * float(np.prod(spacing)) / 1000.0
    space = _Space(allowed, spacing, gap_mm=0.92 * liver_cm3 ** (1 / 3))
    forest = _Forest(space, rng)
    # the thinnest twigs a real label holds are about 2 voxels wide at 0.6-0.8 mm pixels
    r_min = rng.uniform(0.72, 0.9)
    # lumen budget: a few % of the liver, as in real CT; the thickest vessels are grown first,
    # so the budget decides how far down the tree goes
    share = rng.uniform(0.036, 0.043)
    # branch length grows with calibre (long trunks, short twigs), as in vascular morphometry
    vein = _GrowParams(r_min=r_min, len_a=4.0, len_b=1.5, curvature=0.06, margin=1.0, flow_split=(0.25, 0.5))
    # the hepatic artery runs beside the portal branches in reality: it does not compete for space
    art = _GrowParams(r_min=max(R_MIN_MM, r_min - 0.2), len_a=5.0, len_b=4.0, curvature=0.3, margin=1.0,
                      flow_split=(0.3, 0.5), shared=False, max_nodes=250)
    liver_c, liver_semi = np.asarray(liver_c), np.asarray(liver_semi)

    def place(name, q, toward, r, params, tries=80):
        """Root at the point nearest to liver-normalised q, among random ones near it, that
        leaves room for radius r (a tumour or the liver's edge may be at q itself); at the
        roomiest one, and thinner, if none does."""
        base = liver_c + np.asarray(q) * liver_semi
        cands = base + rng.uniform(-0.3, 0.3, (tries, 3)) * liver_semi
        clear = np.array([space.clearance(c) for c in cands])
        roomy = clear >= r + params.margin + 1.0
        if roomy.any():
            dist = np.linalg.norm(cands - base, axis=1)
            best = cands[roomy][int(np.argmin(dist[roomy]))]
        else:
            best = cands[int(np.argmax(clear))]
            r = float(clear.max()) - params.margin - 0.5
        toward_mm = liver_c + np.asarray(toward) * liver_semi
        if r < 1.5 * params.r_min or not forest.add_root(name, best, toward_mm - best, r, params):
            log.debug("phantom: no room for a %s root", name)
            return False
        return True

    r_root = float(np.clip(0.595 * liver_cm3 ** (1 / 3), 2.0, R_MAX_MM / 1.05))
    r_lo, r_hi = 0.95 * r_root, 1.05 * r_root
    # portal vein: enters at the hilum (posterior, medial, inferior) and heads for the right lobe
    place("portalvein", (0.15, 0.2, -0.3), (0.0, -0.5, 0.1), rng.uniform(r_lo, r_hi), vein)
    # hepatic veins: right and middle-left, from the IVC (posterior, medial, superior)
    place("venoussystem", (0.30, 0.05, 0.5), (-0.1, -0.7, -0.3), rng.uniform(r_lo, r_hi) * 0.95, vein)
    place("venoussystem", (0.15, 0.3, 0.5), (-0.5, 0.4, -0.3), rng.uniform(r_lo, r_hi) * 0.85, vein)
    place("artery", (0.05, 0.22, -0.45), (0.0, -0.4, 0.3), min(2.6, 0.45 * r_hi), art)
    forest.grow(volume_budget=share * float(allowed.sum()) * float(np.prod(spacing)))
    trees = forest.result()
    for name in TREE_NAMES:
        trees.setdefault(name, Tree(name, np.zeros((0, 3)), np.zeros(0), np.zeros((0, 2), dtype=np.int64)))
    return trees


def _vessel_contrast(trees: dict[str, Tree], shape, spacing, par_mean: float, rng: np.random.Generator,
                     label_rim: float = LABEL_RIM_MM, gain: float = 1.0):
    """Labels and the contrast image of the trees.

    Each tree gets a blood enhancement over the parenchyma (portal-venous phase: portal vein
    and hepatic veins 34-76 HU, the artery more); the thickest segments (the trunks near the
    IVC and the hilum) carry less: from a mean radius of TRUNK_RAMP_MM[0] to TRUNK_RAMP_MM[1]
    mm the enhancement falls linearly to x0-0.35 (inflow of unenhanced blood); and it varies
    smoothly in space (x(1 +- ~0.35), features ~12 mm: mixing). Every blood enhancement is
    scaled by ``gain`` (the preset's calibration), after the draws, so the trees, the trunk
    factor and the mixing field do not depend on it.
    Returns (masks name -> uint8 (H, W, D), contrast float32 (H, W, D) HU to add inside the liver,
    blood enhancement per tree in HU).
    """
    enhance = {"portalvein": rng.uniform(42, 76), "venoussystem": rng.uniform(34, 70), "artery": rng.uniform(70, 120)}
    enhance = {k: gain * v for k, v in enhance.items()}
    trunk = rng.uniform(0.0, 0.35)
    ra, rb = TRUNK_RAMP_MM
    masks: dict[str, np.ndarray] = {}
    contrast = np.zeros(shape, dtype=np.float32)
    for name in TREE_NAMES:
        t = trees[name]
        r_edge = (t.radius[t.edges[:, 0]] + t.radius[t.edges[:, 1]]) / 2 if len(t.edges) else np.zeros(0)
        factor = 1.0 - (1.0 - trunk) * np.clip((r_edge - ra) / (rb - ra), 0.0, 1.0)
        lab, occ = rasterise_tree(t, shape, spacing, edge_weight=factor, label_rim=label_rim)
        np.maximum(contrast, occ * np.float32(enhance[name]), out=contrast)
        masks[name] = lab
    box = _bbox(contrast > 0, 1) if (contrast > 0).any() else tuple(slice(0, 1) for _ in range(3))
    sub_shape = tuple(b.stop - b.start for b in box)
    contrast[box] *= np.clip(1.0 + rng.uniform(0.25, 0.45) * _smooth_field(sub_shape, spacing, 12.0, rng), 0.3, 1.7)
    return masks, contrast, {**{k: float(par_mean + v) for k, v in enhance.items()}, "trunk_factor": float(trunk)}


def _scanner(hu: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    """PSF blur (partial volume), then noise correlated in-plane over about a voxel with
    unequal row / column widths (slightly streaky, as a reconstruction kernel leaves it).
    ``hu`` float32 (H, W, D) -> int16 HU, clipped to [-1024, 3071]."""
    psf_mm = np.asarray(PSF_SIGMA_MM)
    img = ndimage.gaussian_filter(hu, sigma=psf_mm / np.asarray(spacing), mode="nearest", truncate=3.0)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    corr = rng.uniform(0.4, 0.55) * rng.permutation(np.array([1.0, rng.uniform(1.3, 1.6)]))
    noise = ndimage.gaussian_filter(noise, sigma=(corr[0], corr[1], 0), truncate=3.0)
    # per-voxel noise grows as voxels shrink (fewer photons each): x (0.9 mm / in-plane spacing)^0.6
    noise *= np.float32(rng.uniform(*NOISE_HU) * (0.9 / float(np.mean(spacing[:2]))) ** 0.6 / (noise.std() + 1e-6))
    img += noise
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


# ----------------------------------------------------------------------------- patient
def generate_patient(index: int, seed: int, preset: str, label_rim: float = LABEL_RIM_MM) -> PhantomPatient:
    """Generate patient ``index`` (1-based, folder ``3Dircadb1.<index>``) of a phantom set.

    Deterministic in (index, seed, preset). Every third patient (index % 3 == 0) is marked
    ``unsigned_intercept`` (uint16 pixels, intercept -1024 when written). ``label_rim`` (mm):
    the vessel labels reach hypot(r, label_rim) from the centreline (0: the exact lumen);
    the image does not depend on it.
    """
    pr = _check_preset(preset)
    if index < 1:
        raise ValueError(f"index must be >= 1, got {index}")
    _check_label_rim(label_rim)
    rng = np.random.default_rng([int(seed), int(index)])
    shape, spacing = _grid(pr, rng)
    hu, liver, tumours, allowed, info = _anatomy(shape, spacing, pr, rng)
    trees = _grow_vessels(allowed, info["liver_centre_mm"], info["liver_semi_mm"], spacing, rng)
    masks, contrast, blood = _vessel_contrast(trees, shape, spacing, info["parenchyma_mean_hu"], rng, label_rim,
                                             pr.enhance_gain)
    vessel_any = np.zeros(shape, dtype=bool)
    for name in TREE_NAMES:
        vessel_any |= masks[name] > 0
    outside = vessel_any & ~liver
    if outside.any():  # growth keeps a margin, so this is a guard, not the rule
        log.debug("phantom %d: %d vessel voxels outside the liver outline, liver extended", index, int(outside.sum()))
        liver |= vessel_any
    contrast[~liver] = 0.0
    hu += contrast
    out = _scanner(hu, spacing, rng)

    masks = {"liver": liver.astype(np.uint8), **masks}
    for k, tm in enumerate(tumours, start=1):
        masks[f"livertumor{k:02d}"] = tm.astype(np.uint8)
    info.update(n_tumours=len(tumours), blood_hu=blood)
    return PhantomPatient(index=index, hu=out, masks=masks, spacing=tuple(float(s) for s in spacing), trees=trees,
                          unsigned_intercept=(index % 3 == 0), preset=preset, seed=seed, info=info,
                          label_rim=float(label_rim))


# ----------------------------------------------------------------------------- centreline JSON
def centerlines_json(patient: PhantomPatient) -> dict:
    return {
        "format": CENTERLINES_FORMAT,
        "axes": "row, col, slice; position_mm = voxel_index * spacing",
        "spacing_mm": list(patient.spacing),
        "shape": list(patient.hu.shape),
        "label_trees": list(LABEL_TREES),
        "label_rim_mm": float(patient.label_rim),
        "trees": [patient.trees[n].to_json() for n in TREE_NAMES],
    }


def load_centerlines(path: str | Path) -> dict[str, Tree]:
    """Read ``centerlines.json`` -> tree name -> :class:`Tree`. ValueError naming the file if malformed."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        if d.get("format") not in CENTERLINES_FORMATS_READ:
            raise KeyError("format")
        return {t["name"]: Tree.from_json(t) for t in d["trees"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a phantom centreline file ({e})") from e


def patient_dir(out: str | Path, index: int) -> Path:
    return Path(out) / f"{PATIENT_PREFIX}{index}"


def _make_one(out: str, index: int, seed: int, preset: str, zip_output: bool, overwrite: bool,
              label_rim: float = LABEL_RIM_MM) -> dict:
    t0 = time.perf_counter()
    p = generate_patient(index, seed, preset, label_rim)
    t1 = time.perf_counter()
    final = patient_dir(out, index)
    with atomic_dir(final, overwrite=overwrite) as tmp:
        write_patient(tmp, p.hu, p.masks, p.spacing, unsigned_intercept=p.unsigned_intercept,
                      zip_output=zip_output, patient_id=final.name)
        (tmp / CENTERLINES_FILE).write_text(json.dumps(centerlines_json(p)))
    t2 = time.perf_counter()
    return {"index": index, "path": str(final), "shape": list(p.hu.shape), "spacing": list(p.spacing),
            "unsigned_intercept": p.unsigned_intercept, "n_tumours": p.info["n_tumours"],
            "generate_s": t1 - t0, "write_s": t2 - t1}


def generator_fingerprint() -> str:
    """sha256 of the phantom package's sources: it changes whenever the phantoms may change,
    so data made by an older generator is not taken for current (:func:`manifest_is_current`)."""
    h = hashlib.sha256()
    for src in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()


def manifest_is_current(folder: str | Path) -> bool:
    """True when ``folder`` holds a phantom manifest written by this version of the generator."""
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("generator_sha256") == generator_fingerprint()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty (pass --overwrite to replace its patients)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{out}: cannot be written ({e.strerror or e})") from e


def make_phantoms(
    out: str | Path,
    cases: int,
    preset: str,
    seed: int,
    workers: int = 1,
    zip_output: bool = False,
    overwrite: bool = False,
    label_rim: float = LABEL_RIM_MM,
) -> list[Path]:
    """Write ``cases`` patients ``<out>/3Dircadb1.<n>`` (n = 1..cases) in the 3D-IRCADb layout.

    Each patient folder holds PATIENT_DICOM and MASKS_DICOM (or the two nested zips with
    ``zip_output``) and ``centerlines.json``; it is written to a temporary folder and
    renamed when complete. ``<out>/phantom_manifest.json`` records preset, seed, label rim
    and per-patient grid and timings. ``label_rim``: see :func:`generate_patient`. Raises
    ValueError on bad input (unknown preset, cases <= 0, workers <= 0, a rim outside 0-3 mm,
    ``out`` not empty without ``overwrite``, ``out`` not writable) before anything is written. Returns the patient folders in order.
    """
    _check_preset(preset)
    if int(cases) != cases or cases <= 0:
        raise ValueError(f"cases must be a positive integer, got {cases}")
    if workers <= 0:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _check_label_rim(label_rim)
    out = Path(out)
    _check_out(out, overwrite)
    args = [(str(out), n, int(seed), preset, bool(zip_output), bool(overwrite), float(label_rim))
            for n in range(1, cases + 1)]
    results: list[dict] = []
    t0 = time.perf_counter()
    with tqdm(total=cases, desc=f"phantoms ({preset})", unit="patient") as bar:
        if workers == 1:
            for a in args:
                results.append(_make_one(*a))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, cases)) as ex:
                futs = [ex.submit(_make_one, *a) for a in args]
                for fu in as_completed(futs):
                    results.append(fu.result())
                    bar.update()
    results.sort(key=lambda r: r["index"])
    if overwrite:
        stale = [p for p in out.glob(f"{PATIENT_PREFIX}*")
                 if p.is_dir() and p.name[len(PATIENT_PREFIX):].isdigit() and int(p.name[len(PATIENT_PREFIX):]) > cases]
        for p in stale:
            log.info("removing stale patient %s (--overwrite, only %d cases now)", p, cases)
            shutil.rmtree(p)
    manifest = {"preset": preset, "seed": int(seed), "cases": cases, "zip": bool(zip_output), "label_rim_mm": float(label_rim),
                "generator_sha256": generator_fingerprint(),
                "wall_s": time.perf_counter() - t0, "workers": workers, "patients": results}
    with atomic_path(out / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    log.info("wrote %d %s phantom patients to %s in %.1f s", cases, preset, out, manifest["wall_s"])
    return [Path(r["path"]) for r in results]
