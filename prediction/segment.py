"""The work behind predict.py: segment new CT scans with one model file (docs/DESIGN.md section 6).

Per scan (:func:`segment_case`): read it (:mod:`inference.scans`, the preprocessing readers) and
segment it with :meth:`inference.predictor.Predictor.predict_scan` (HU window and, with a liver
mask, the training crop to the liver's slices; the offline salience from the generator embedded
in the checkpoint; the checkpoint's resize rule, threshold and smallest component), the mask
back on the input grid. Outputs, all in the input's geometry:

    <case>_vessels.nii.gz   uint8 {0, 1}
    <case>_liver.nii.gz     uint8 {0, 1}, the liver mask of --liver_model (inference.liver)
    <case>_trees.nii.gz     uint8 label map of a model of classes (main.py --classes) or of a binary
                            model with a tree model (--tree_model, inference.tree_model): 0 background,
                            k + 1 for its k-th class (1 portal vein, 2 hepatic veins for portal,hepatic),
                            one tree per connected piece (inference.trees); <case>_vessels is their union
    <case>_<class>.stl|obj  with --mesh and a model of classes: one surface per tree
    <case>_prob.nii.gz      float32 probabilities (--prob)
    <case>_vessels.stl|obj  vessel surface in patient (LPS) millimetres (--mesh)
    <case>_seg.dcm          DICOM-SEG of the mask referencing the source series (--dicom_seg, DICOM input)
    <case>_graph.png        with --graph --figures: the graph drawn over the axial MIP of the mask
    <case>_graph.graphml, <case>_graph.vtp   the branch graph (--graph): nodes and branches with
                            length and radius in mm, for networkx; polylines with the radius for
                            3D Slicer / ParaView (evaluation.graph)
    <case>_mip.png, <case>_3d.png   MIPs with the vessels overlaid, a 3-D rendering (--figures)
    <case>_stats.json       volume, centreline length, radius histogram, components, provenance

A case's files are written to a temporary folder and moved into place when all are complete,
so a failure leaves none of them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage, sparse
from skimage import measure
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from evaluation.metrics import RADIUS_BIN_NAMES, RADIUS_BINS_MM, centreline_recall_by_radius, n_components, skeleton
from inference.liver import (DEFAULT_MARGIN_MM, check_target, embedded_liver_model, liver_warnings, model_target,
                             near_liver, segment_liver, volume_ml)
from inference.predictor import Predictor, spacing_warning, training_spacing
from inference.scans import CaseSource, Geometry, find_cases, read_mask, read_scan, to_image, write_nifti
from inference.tree_model import TreeModel, check_binary, load_tree_model, vessel_model_warning
from inference.trees import TREE_SMOOTHNESS, check_smoothness
from preprocessing.errors import PreprocessError
from utils import provenance
from utils.h5io import apply_hu_window
from utils.manifests import class_tree
from utils.orientation import lps_view

log = logging.getLogger("predict")

MESH_FORMATS = ("stl", "obj")
#: Taubin smoothing passes on the marching-cubes surface (light: the surface moves a fraction of a voxel)
MESH_SMOOTH_ITERATIONS = 5
#: the generator is run on the bounding box of the non-zero image when that saves at least this fraction
SALIENCE_ROI_MIN_SAVING = 0.1


# ----------------------------------------------------------------------------- prediction
class Stopwatch:
    """Wall and process CPU seconds of consecutive stages: ``lap(name)`` ends the stage ``name``."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> float:
        t, c = time.perf_counter(), time.process_time()
        self.wall[name] = self.wall.get(name, 0.0) + t - self._t
        self.cpu[name] = self.cpu.get(name, 0.0) + c - self._c
        self._t, self._c = t, c
        return self.wall[name]


# ----------------------------------------------------------------------------- statistics
#: neighbour offsets of a 26-connected grid, each pair counted once (13 of the 26)
_HALF_NEIGHBOURS = [o for o in np.ndindex(3, 3, 3) if (np.array(o) - 1).tolist() > [0, 0, 0]]


def centreline_length_mm(skel: np.ndarray, spacing: Sequence[float]) -> float:
    """Length of a skeleton (bool (H, W, D)) in mm: the sum of the lengths of its 26-neighbour links.

    Every pair of neighbouring skeleton voxels adds the distance between their centres, so a
    one-voxel-thin line of n voxels gives the polyline through their centres. Where three
    voxels touch pairwise (at branch points, in corners) the triangle adds a little more.
    """
    skel = np.asarray(skel, dtype=bool)
    sp = np.asarray(spacing, dtype=np.float64)
    p = np.pad(skel, 1)
    core = p[1:-1, 1:-1, 1:-1]
    total = 0.0
    h, w, d = skel.shape
    for o in _HALF_NEIGHBOURS:
        off = np.array(o) - 1
        other = p[1 + off[0]:1 + off[0] + h, 1 + off[1]:1 + off[1] + w, 1 + off[2]:1 + off[2] + d]
        total += np.count_nonzero(core & other) * float(np.sqrt(((off * sp) ** 2).sum()))
    return total


def vessel_stats(mask: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Volume (mL), centreline length (mm), radius histogram and components of a vessel mask.

    Radius at a centreline voxel: the mask's Euclidean distance transform in mm there (as
    ``evaluation.metrics.centreline_recall_by_radius`` measures the truth), binned like the
    metrics (< 1, 1-2, 2-3, >= 3 mm); the histogram counts centreline voxels per bin.
    """
    mask = np.asarray(mask, dtype=bool)
    sp = tuple(float(s) for s in spacing)
    skel = skeleton(mask)
    by_radius = centreline_recall_by_radius(mask, mask, sp, target_skeleton=skel)
    n_cl = int(skel.sum())
    hist = {}
    for (lo, hi), name in zip(RADIUS_BINS_MM, RADIUS_BIN_NAMES):
        n = int(by_radius[f"cl_n_{name}"])
        hist[name] = {"radius_mm": [lo, None if np.isinf(hi) else hi], "centreline_voxels": n,
                      "fraction": n / n_cl if n_cl else None}
    sizes: list[int] = []
    if mask.any():
        lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = sorted(np.bincount(lab.ravel())[1:].tolist(), reverse=True)
    voxel_ml = float(np.prod(sp)) / 1000.0
    return {
        "vessel_voxels": int(mask.sum()),
        "vessel_volume_ml": float(mask.sum()) * voxel_ml,
        "centreline_voxels": n_cl,
        "centreline_length_mm": centreline_length_mm(skel, sp),
        "radius_histogram": hist,
        "connected_components": n_components(mask),
        "largest_component_fraction": sizes[0] / sum(sizes) if sizes else None,
        "component_volumes_ml_top5": [s * voxel_ml for s in sizes[:5]],
        "conventions": "26-connectivity; radius = distance transform of the mask at its skeleton (mm); "
                       "bins as the metrics' centreline recall (docs/DESIGN.md section 4)",
    }


# ----------------------------------------------------------------------------- mesh
def taubin_smooth(verts: np.ndarray, faces: np.ndarray, iterations: int = MESH_SMOOTH_ITERATIONS,
                  lam: float = 0.5, mu: float = -0.53) -> np.ndarray:
    """Taubin's lambda / mu smoothing (umbrella operator): removes the voxel staircase without the
    shrinkage of plain Laplacian smoothing; every component keeps its place and size."""
    n = len(verts)
    if n == 0 or iterations <= 0:
        return verts
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    adj = sparse.csr_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    adj.data[:] = 1.0  # duplicate edges count once
    deg = np.asarray(adj.sum(axis=1)).ravel()
    deg[deg == 0] = 1.0
    v = verts.astype(np.float64).copy()
    for _ in range(iterations):
        for f in (lam, mu):
            v += f * (adj @ v / deg[:, None] - v)
    return v


def vessel_mesh(mask: np.ndarray, geometry: Geometry, smooth_iterations: int = MESH_SMOOTH_ITERATIONS,
                step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Surface of ``mask`` (H, W, D): vertices (N, 3) in patient LPS mm, faces (M, 3) int, outward.

    Marching cubes (skimage) at 0.5 on the binary mask's bounding box padded with zeros (every
    surface closes, half a voxel outside the vessel's voxel centres), mapped to millimetres
    with ``geometry`` (the ITK geometry of the (H, W, D) array), then lightly smoothed
    (:func:`taubin_smooth`). ``step`` > 1 gives a coarser mesh (figures).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    pad = 1
    box = []
    for ax in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append((int(idx[0]), int(idx[-1]) + 1))
    sub = np.pad(mask[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]], pad).astype(np.float32)
    verts, faces, _, _ = measure.marching_cubes(sub, 0.5, step_size=step, allow_degenerate=False)
    verts = verts + np.array([b[0] - pad for b in box], dtype=np.float64)
    pts = geometry.physical(verts)
    d = np.asarray(geometry.direction).reshape(3, 3)
    # the map from (row, col, slice) indices to LPS swaps row and column (a mirror) and applies the
    # direction matrix; skimage's winding comes out outward after it unless the direction mirrors too
    if np.linalg.det(d) < 0:
        faces = faces[:, ::-1]
    return taubin_smooth(pts, faces, smooth_iterations), faces.astype(np.int64)


def write_mesh(path: Path, verts: np.ndarray, faces: np.ndarray) -> Path:
    """Binary STL or Wavefront OBJ by the suffix of ``path`` (units mm, LPS)."""
    suffix = path.suffix.lower()
    if suffix == ".stl":
        tri = verts[faces].astype(np.float32)  # (M, 3, 3)
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        rec = np.zeros(len(faces), dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
        rec["n"], rec["v"] = n, tri
        with open(path, "wb") as f:
            f.write(b"livervessel vessel surface, LPS mm".ljust(80, b" "))
            f.write(np.uint32(len(faces)).tobytes())
            f.write(rec.tobytes())
    elif suffix == ".obj":
        with open(path, "w") as f:
            f.write("# livervessel vessel surface, LPS mm\n")
            np.savetxt(f, verts, fmt="v %.4f %.4f %.4f")
            np.savetxt(f, faces + 1, fmt="f %d %d %d")
    else:
        raise ValueError(f"{path}: mesh format must be .stl or .obj")
    return path


def read_stl(path: Path) -> np.ndarray:
    """Triangles (M, 3, 3) float32 of a binary STL written by :func:`write_mesh`."""
    raw = Path(path).read_bytes()
    n = int(np.frombuffer(raw[80:84], dtype="<u4")[0])
    rec = np.frombuffer(raw[84:84 + 50 * n], dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    return rec["v"].copy()


# ----------------------------------------------------------------------------- figures
#: colours of the trees in figures, as in the DICOM-SEG (prediction.dicom_seg.SEGMENTS): label 1 (portal
#: vein) red, 2 (hepatic veins) blue, then others
TREE_COLOURS = ((0.86, 0.16, 0.16), (0.16, 0.35, 0.90), (0.20, 0.75, 0.30), (0.85, 0.65, 0.10))
_COLOUR_NAMES = ("red", "blue", "green", "yellow")
#: where the light of the 3-D rendering comes from (view direction, patient LPS): front, above, right
LIGHT = np.array([-0.3, -1.0, 0.6])


def shaded_colours(verts: np.ndarray, faces: np.ndarray, colour: Sequence[float]) -> np.ndarray:
    """RGB (M, 3) of each face of a surface lit from ``LIGHT``: ambient 0.35 plus Lambert's diffuse
    term 0.65 |n . l| (two-sided, so a face seen from inside is lit as well)."""
    tri = verts[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    light = LIGHT / np.linalg.norm(LIGHT)
    k = 0.35 + 0.65 * np.abs(n @ light)
    return np.clip(k[:, None] * np.asarray(colour, dtype=np.float64)[None], 0.0, 1.0)


def figure_mesh_step(mask: np.ndarray, budget: int) -> int:
    """The marching-cubes step that keeps the surface of ``mask`` near ``budget`` triangles: about
    two per boundary voxel at step 1, and a step of s divides them by s squared."""
    mask = np.asarray(mask, dtype=bool)
    boundary = int(np.count_nonzero(mask & ~ndimage.binary_erosion(mask)))
    return max(1, int(np.ceil(np.sqrt(2.0 * boundary / max(budget, 1)))))


def scan_figures(mip_path: Path, render_path: Path, image: np.ndarray, mask: np.ndarray,
                 spacing: Sequence[float], geometry: Geometry, title: str = "",
                 labels: Optional[np.ndarray] = None, names: Sequence[str] = ()) -> list[Path]:
    """Axial and coronal MIPs of the windowed scan with the vessel MIP overlaid; a shaded 3-D surface.

    image: (H, W, D) in [0, 1] (HU window); mask bool (H, W, D); spacing (row, col, slice) mm, all
    in the stored order of the image whose ITK geometry is ``geometry``. ``labels`` (H, W, D) uint8
    with class ``names`` (a model of classes): each tree in its colour (``TREE_COLOURS``), in the
    MIPs and the rendering. The MIPs are drawn in LPS order (:func:`utils.orientation.lps_view`), so
    a coronal, sagittal, mirrored or feet-first series gives the same axial and coronal views.
    """
    from evaluation.figures import _save, error_rgb, plt

    view = lps_view(geometry.direction)
    lps_image, lps_mask, lps_spacing = view.forward(image), view.forward(mask), view.spacing(spacing)
    lps_labels = None if labels is None else view.forward(labels)
    # coronal: slices down the image, reversed so that superior (the LPS slice axis) is at the top
    views = [("axial MIP", lambda a: a.max(axis=2), lps_spacing[0] / lps_spacing[1]),
             ("coronal MIP", lambda a: a.max(axis=0).T[::-1], lps_spacing[2] / lps_spacing[1])]
    trees = [] if labels is None else [(k + 1, name, TREE_COLOURS[k % len(TREE_COLOURS)]) for k, name in
                                       enumerate(names)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), squeeze=False)
    for ax, (name, proj, aspect) in zip(axes[0], views):
        if not trees:
            m = proj(lps_mask)
            ax.imshow(error_rgb(proj(lps_image), m, m, alpha=0.75), aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name}: scan, vessels in green", fontsize=9)
        else:
            g = proj(lps_image)
            rgb = np.repeat(((g - g.min()) / max(float(np.ptp(g)), 1e-6))[..., None], 3, axis=2)
            # the tree nearer the front of the projection wins where both project
            for value, _, colour in trees[::-1]:
                m = proj(lps_labels == value)
                rgb[m] = 0.25 * rgb[m] + 0.75 * np.asarray(colour)
            ax.imshow(rgb, aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name}: " + ", ".join(f"{n} {c}" for n, c in zip(
                [t[1] for t in trees], _COLOUR_NAMES)), fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, mip_path)

    fig = plt.figure(figsize=(6.4, 6.4))
    ax = fig.add_subplot(projection="3d")
    # the surfaces in patient mm from the stored order and its geometry
    parts = [(mask, (0.80, 0.22, 0.20), "vessels")] if not trees else [
        (labels == value, colour, name) for value, name, colour in trees]
    budget = 80_000 // max(len(parts), 1)
    lo_all, hi_all = [], []
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    for part, colour, _ in parts:
        # a coarser marching-cubes step rather than dropped faces: a surface with holes reads as a wireframe
        verts, faces = vessel_mesh(part, geometry, step=figure_mesh_step(part, budget))
        if not len(faces):
            continue
        ax.add_collection3d(Poly3DCollection(verts[faces], facecolors=shaded_colours(verts, faces, colour),
                                             edgecolor="none"))
        lo_all.append(verts.min(0))
        hi_all.append(verts.max(0))
    if lo_all:
        lo, hi = np.min(lo_all, axis=0), np.max(hi_all, axis=0)
        c, r = (lo + hi) / 2, float((hi - lo).max()) / 2 + 1e-3
        ax.set_xlim(c[0] - r, c[0] + r)
        ax.set_ylim(c[1] - r, c[1] + r)
        ax.set_zlim(c[2] - r, c[2] + r)
        # anterior view, patient's right on the left of the image, superior up (radiological)
        ax.view_init(elev=15, azim=-90)
    ax.set_xlabel("x (mm, R->L)")
    ax.set_ylabel("y (mm, A->P)")
    ax.set_zlabel("z (mm, I->S)")
    what = "vessel surface" if not trees else " and ".join(
        f"{t[1]} ({c})" for t, c in zip(trees, _COLOUR_NAMES))
    ax.set_title((title + "\n" if title else "") + f"{what}, patient mm", fontsize=9)
    _save(fig, render_path)
    return [mip_path, render_path]


def seg_tree_labels(labels: Optional[np.ndarray], classes: Sequence[str]) -> Optional[np.ndarray]:
    """A label map (1 .. len(classes)) renumbered for the DICOM-SEG's two coded trees (1 portal
    vein, 2 hepatic veins) when ``classes`` are those two trees under any of their names
    (:func:`utils.manifests.class_tree`: ``portal`` or ``portalvein``, ``hepatic``, ``venoussystem``
    or ``venacava``) in either order; None when they are not (the SEG then holds the union)."""
    order = [class_tree(c) for c in classes]
    if labels is None or sorted(order) != ["hepatic", "portal"]:
        return None
    out = np.zeros(labels.shape, np.uint8)
    out[labels == order.index("portal") + 1] = 1
    out[labels == order.index("hepatic") + 1] = 2
    return out


# ----------------------------------------------------------------------------- one case, many cases
def output_names(case: str, prob: bool, mesh: Optional[str], figures: bool, graph: bool = False,
                 dicom_seg: bool = False, liver: bool = False, classes: Sequence[str] = ()) -> list[str]:
    """The file names ``predict.py`` writes for ``case`` with these options (stats.json included);
    ``liver``: the liver model runs (no ``--liver_mask``), so its mask is written; ``classes``: the
    model's classes (a label map and, with ``mesh``, one surface per tree)."""
    names = [f"{case}_vessels.nii.gz", f"{case}_stats.json"]
    if classes:
        names.append(f"{case}_trees.nii.gz")
    if liver:
        names.append(f"{case}_liver.nii.gz")
    if prob:
        names.append(f"{case}_prob.nii.gz")
    if mesh:
        names.append(f"{case}_vessels.{mesh}")
        names += [f"{case}_{c}.{mesh}" for c in classes]
    if graph:
        names += [f"{case}_graph.graphml", f"{case}_graph.vtp"]
    if graph and figures:
        names.append(f"{case}_graph.png")
    if dicom_seg:
        names.append(f"{case}_seg.dcm")
    if figures:
        names += [f"{case}_mip.png", f"{case}_3d.png"]
    return names


@dataclass
class CaseResult:
    """How one scan went: ``status`` written / skipped (outputs of this model and options kept) /
    failed (``message``), its files, statistics and the seconds (wall, CPU) of each stage."""
    case: str
    status: str  # "written" | "skipped" | "failed"
    files: list[Path] = field(default_factory=list)
    stats: Optional[dict] = None
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    message: str = ""


#: warn when a scan's slices are more than this many times thicker than the training data's
SLICE_THICKNESS_TOLERANCE = 1.5


def training_slice_mm(ckpt: Optional[dict]) -> Optional[float]:
    """Median slice spacing (mm) of the data a checkpoint was trained on (its dataset manifest);
    None for checkpoints written before manifests."""
    trained = training_spacing(ckpt)
    return trained[2] if trained else None


def scan_warnings(seg: Predictor, case: str, spacing: Sequence[float], shape: Sequence[int]) -> list[str]:
    """What makes a scan of ``shape`` (H, W, D) and ``spacing`` (row, col, slice) mm, in the order
    the model sees it, unlike the model's training data: in-plane spacing more than 20% off
    (``inference.predictor.spacing_warning``), slices more than 1.5x thicker (the
    project measured 0.08-0.12 Dice lost at 2-3x). Each is one line, logged and kept in stats.json."""
    out = []
    w = spacing_warning(case, spacing, shape, seg.ckpt or {}, seg.img_size)
    if w:
        out.append(w)
    trained = training_slice_mm(seg.ckpt)
    if trained and spacing[2] > SLICE_THICKNESS_TOLERANCE * trained:
        out.append(f"{case}: slices {spacing[2]:.3g} mm apart, {spacing[2] / trained:.1f}x the "
                   f"{trained:.3g} mm of the training data: expect a lower Dice (thin vessels blur across slices)")
    return out


def _stats_mismatches(path: Path, wanted: dict) -> list[str]:
    """What differs between the provenance in an earlier ``<case>_stats.json`` and ``wanted``."""
    try:
        stored = json.loads(path.read_text()).get("provenance")
    except (OSError, ValueError, AttributeError):
        return [f"{path.name} unreadable"]
    return provenance.mismatches(stored, wanted)


def _earlier_outputs(stats_path: Path, case: str) -> list[str]:
    """The outputs an earlier ``<case>_stats.json`` lists (file names of this case only)."""
    try:
        listed = json.loads(stats_path.read_text()).get("outputs") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in listed if isinstance(n, str) and Path(n).name == n and n.startswith(f"{case}_")]


def segment_case(seg: Predictor, src: CaseSource, out_dir: Path, *, liver_mask: Optional[str | os.PathLike] = None,
                 liver_model: Optional[Predictor] = None, liver_margin_mm: float = DEFAULT_MARGIN_MM,
                 liver_refine: bool = True, prob: bool = False, mesh: Optional[str] = None, figures: bool = False, graph: bool = False,
                 dicom_seg: bool = False, tta: bool = False,
                 series: Optional[str] = None, batch_size: int = 8, overwrite: bool = False,
                 tree_model: Optional[TreeModel] = None, tree_smoothness: float = TREE_SMOOTHNESS) -> CaseResult:
    """Read, predict and write one scan; all its outputs appear together or not at all.

    Outputs already in ``out_dir`` are kept only when their ``<case>_stats.json`` records the same
    provenance (model sha256, input, options, code version: :mod:`utils.provenance`); otherwise,
    or with ``overwrite``, the scan is segmented again and they are replaced.

    The liver: ``liver_mask`` (a file) is used as given: vessels are kept inside it. Without one,
    ``liver_model`` (a liver model's Predictor, :mod:`inference.liver`) segments it, vessels are
    kept within ``liver_margin_mm`` of it, and its mask is written; ``liver_refine``: its surface is
    corrected by the scan's parenchyma intensity (:func:`inference.liver.refine_by_intensity`).
    With neither, the whole scan.

    ``tree_model`` (:mod:`inference.tree_model`, for a binary ``seg``: :func:`run_predict` checks that
    once, before loading it): labels the vessel mask with its trees, as a model of classes does; its
    labels are the minimum cut of its logit with ``tree_smoothness`` (:func:`inference.trees.cut_trees`).
    """
    if mesh is not None and mesh not in MESH_FORMATS:
        raise ValueError(f"--mesh must be one of {MESH_FORMATS}, got {mesh!r}")
    use_liver_model = liver_model is not None and liver_mask is None
    classes = seg.classes or (tree_model.classes if tree_model is not None else [])
    names = output_names(src.name, prob, mesh, figures, graph, dicom_seg, liver=use_liver_model, classes=classes)
    wanted = provenance.record(seg.sha256, {
        # what the input holds, not only where: a scan replaced under the same name is segmented again
        "input": str(Path(src.path).resolve()), "input_sha256": provenance.path_sha256(src.path),
        "series": series, "tta": tta,
        "liver_mask": None if liver_mask is None else provenance.path_sha256(liver_mask)
        if Path(liver_mask).exists() else str(Path(liver_mask).resolve()),
        "liver_model": liver_model.sha256 if use_liver_model else None,
        "liver_margin_mm": float(liver_margin_mm) if use_liver_model else None,
        "liver_refine": bool(liver_refine) if use_liver_model else None,
        "tree_model": tree_model.sha256 if tree_model is not None else None,
        "tree_smoothness": float(tree_smoothness) if tree_model is not None else None,
        "min_component_mm3": seg.min_component_mm3,
        "generator_sha256": None if seg.generator is None else seg.generator.weights_sha256})
    if not overwrite and all((out_dir / n).is_file() for n in names):
        differ = _stats_mismatches(out_dir / f"{src.name}_stats.json", wanted)
        if not differ:
            log.info("%s: outputs of this model and these options exist in %s, kept (pass --overwrite to redo)",
                     src.name, out_dir)
            return CaseResult(src.name, "skipped", [out_dir / n for n in names])
        log.warning("%s: the outputs in %s were made by something else (%s); computing them again", src.name,
                    out_dir, "; ".join(differ[:4]))
    clock = Stopwatch()
    scan = read_scan(src, series)
    liver = read_mask(liver_mask, scan) if liver_mask is not None else None
    log.info("%s: read %s, %d x %d x %d voxels of %s mm, in %.1f s", src.name, src.path, *scan.hu.shape,
             " x ".join(f"{v:.3g}" for v in scan.spacing), clock.lap("read"))
    # the models run on the scan in the training data's LPS order (a flipped, feet-first, coronal or
    # sagittal series is reordered, never resampled); their outputs go back to the stored order
    view = lps_view(scan.geometry.direction)
    if not view.identity:
        log.info("%s: stored in another axis order than the training data (LPS): the models see it reordered "
                 "(axes %s, flipped %s)", src.name, view.perm, view.flip)
    hu, spacing = view.forward(scan.hu), view.spacing(scan.spacing)
    warnings = scan_warnings(seg, src.name, spacing, hu.shape)
    for w in warnings:
        log.warning("%s", w)
    region = liver = None if liver is None else view.forward(liver)
    if use_liver_model:
        liver = segment_liver(liver_model, hu, spacing, name=src.name, batch_size=batch_size,
                              refine=liver_refine).mask
        region = near_liver(liver, spacing, liver_margin_mm)
        log.info("%s: liver model %.1f s", src.name, clock.lap("liver"))
        if not liver.any():
            warnings.append(f"{src.name}: the liver model found no liver: no vessels kept")
    if liver is not None:
        for w in liver_warnings(liver, spacing, src.name, check_volume=use_liver_model):
            log.warning("%s", w)
            warnings.append(w)
    pred = seg.predict_scan(hu, spacing, region, name=src.name, tta=tta, batch_size=batch_size, clock=clock)
    log.info("%s: salience %.1f s, inference %.1f s", src.name, clock.wall.get("salience", 0.0), clock.wall["inference"])
    if tree_model is not None:
        # its minimum cut, not the one-tree-per-piece step (inference.tree_model says why)
        pred = replace(pred, labels=tree_model.classify(apply_hu_window(hu), pred.mask, spacing, tree_smoothness))
        log.info("%s: tree model %.1f s", src.name, clock.lap("trees"))
    if not view.identity:
        pred = replace(pred, prob=view.back(pred.prob), mask=view.back(pred.mask),
                       labels=None if pred.labels is None else view.back(pred.labels),
                       crop=view.box_back(pred.crop, hu.shape))
        liver = None if liver is None else view.back(liver)
    stats = vessel_stats(pred.mask, scan.spacing)
    if classes:
        stats["trees"] = {c: vessel_stats(pred.labels == k + 1, scan.spacing) for k, c in enumerate(classes)}
        stats["trees_label_values"] = {c: k + 1 for k, c in enumerate(classes)}
    if liver is not None:
        stats["liver"] = {"source": "model" if use_liver_model else "mask",
                          "volume_ml": volume_ml(liver, scan.spacing),
                          "margin_mm": float(liver_margin_mm) if use_liver_model else 0.0,
                          "refined_by_intensity": bool(liver_refine) if use_liver_model else False}
    clock.lap("stats")

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{src.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_nifti(tmp / f"{src.name}_vessels.nii.gz", to_image(pred.mask.astype(np.uint8), scan))
        if use_liver_model:
            write_nifti(tmp / f"{src.name}_liver.nii.gz", to_image(liver.astype(np.uint8), scan))
        if classes:
            write_nifti(tmp / f"{src.name}_trees.nii.gz", to_image(pred.labels, scan))
        if prob:
            # a model of classes (C, H, W, D): the largest class probability (the one the union mask
            # thresholds); a binary model's (H, W, D), also when a tree model gives the classes
            prob_map = pred.prob.max(0) if pred.prob.ndim == 4 else pred.prob
            write_nifti(tmp / f"{src.name}_prob.nii.gz", to_image(prob_map, scan))
        clock.lap("write_nifti")
        if mesh:
            verts, faces = vessel_mesh(pred.mask, scan.geometry)
            write_mesh(tmp / f"{src.name}_vessels.{mesh}", verts, faces)
            for k, c in enumerate(classes):
                write_mesh(tmp / f"{src.name}_{c}.{mesh}", *vessel_mesh(pred.labels == k + 1, scan.geometry))
            stats["mesh"] = {"vertices": int(len(verts)), "faces": int(len(faces)), "units": "mm", "frame": "LPS",
                             "taubin_iterations": MESH_SMOOTH_ITERATIONS}
            clock.lap("mesh")
        if dicom_seg:
            from prediction.dicom_seg import write_dicom_seg

            if scan.dicom_headers is None:
                raise ValueError(f"{src.path}: --dicom_seg needs a DICOM series as input")
            trees = seg_tree_labels(pred.labels, classes)  # the SEG's coded segments (portal vein, hepatic veins)
            write_dicom_seg(tmp / f"{src.name}_seg.dcm", pred.mask.astype(np.uint8) if trees is None else trees,
                            scan.dicom_headers, kind="vessels" if trees is None else "trees",
                            software_version=provenance.code_version())
            clock.lap("dicom_seg")
        if graph:
            from evaluation.graph import in_patient_mm, vessel_graph, write_graphml, write_vtk_polylines

            # paths in index x spacing mm; each branch's tree from the label map when there is one
            grid_graph = vessel_graph(pred.mask, scan.spacing, labels=pred.labels)
            g = in_patient_mm(grid_graph, scan.spacing, scan.geometry.physical)
            write_graphml(g, tmp / f"{src.name}_graph.graphml")
            write_vtk_polylines(g, tmp / f"{src.name}_graph.vtp")
            if figures:
                from evaluation.figures import graph_figure

                graph_figure(tmp / f"{src.name}_graph.png", pred.mask, scan.spacing, grid_graph, title=src.name)
            stats["graph"] = {"branch_points": len(g.branch_points), "end_points": len(g.end_points),
                              "branches": len(g.branches), "loops": sum(b.kind == "loop" for b in g.branches),
                              "units": "mm", "frame": "LPS"}
            clock.lap("graph")
        if figures:
            scan_figures(tmp / f"{src.name}_mip.png", tmp / f"{src.name}_3d.png", apply_hu_window(scan.hu), pred.mask, scan.spacing,
                         scan.geometry, title=f"{src.name}: {stats['vessel_volume_ml']:.1f} mL, "
                                              f"{stats['connected_components']} components",
                         labels=pred.labels, names=classes)
            clock.lap("figures")
        doc = {
            "case": src.name, "input": scan.description, "model": seg.describe(),
            "liver_mask": str(liver_mask) if liver_mask is not None else None,
            "liver_model": liver_model.describe() if use_liver_model else None,
            "tree_model": None if tree_model is None else {"path": tree_model.path, "sha256": tree_model.sha256,
                                                           "classes": tree_model.classes,
                                                           "smoothness": float(tree_smoothness),
                                                           "trained_on": tree_model.info.get("cases")},
            "crop_hwd": list(pred.crop), "tta": tta, "device": seg.device, "warnings": warnings, "stats": stats,
            # how the models saw the scan: None when stored in LPS order, else the stored axis each
            # LPS axis came from and whether it was reversed (DICOM), or the stored orientation a
            # NIfTI scan was reordered from when it was read
            "reordered_to_lps": ({"axes": list(view.perm), "flipped": list(view.flip)} if not view.identity else
                                 {"from_orientation": scan.reorient} if scan.reorient else None),
            "outputs": [n for n in names if n != f"{src.name}_stats.json"],
            "seconds": {k: round(v, 3) for k, v in clock.wall.items()},
            "cpu_seconds": {k: round(v, 3) for k, v in clock.cpu.items()},
            "created": wanted["created"], "code_version": wanted["code_version"], "provenance": wanted,
        }
        stats_name = f"{src.name}_stats.json"
        (tmp / stats_name).write_text(json.dumps(doc, indent=1))
        # the earlier stats.json goes first and the new one comes last: a run stopped in between
        # leaves no record that could vouch for a mix of old and new files; the earlier outputs
        # these options no longer make go too (a liver mask, a probability map, a tree's surface)
        stale = _earlier_outputs(out_dir / stats_name, src.name)
        (out_dir / stats_name).unlink(missing_ok=True)
        for n in names:
            if n != stats_name:
                os.replace(tmp / n, out_dir / n)
        for n in sorted(set(stale) - set(names)):
            (out_dir / n).unlink(missing_ok=True)
        os.replace(tmp / stats_name, out_dir / stats_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CaseResult(src.name, "written", [out_dir / n for n in names], stats, dict(clock.wall), dict(clock.cpu))


def run_predict(model: str | os.PathLike, input_path: str | os.PathLike, output: str | os.PathLike, *,
                device: str = "auto", head: Optional[str | os.PathLike] = None,
                liver_mask: Optional[str | os.PathLike] = None, liver_model: Optional[str | os.PathLike] = None,
                liver_margin_mm: float = DEFAULT_MARGIN_MM, liver_refine: bool = True,
                use_embedded_liver: bool = True, prob: bool = False, mesh: Optional[str] = None,
                figures: bool = False, graph: bool = False, dicom_seg: bool = False, tta: bool = False,
                series: Optional[str] = None,
                batch_size: int = 8, overwrite: bool = False,
                min_component_mm3: Optional[float] = None,
                tree_model: Optional[str | os.PathLike] = None,
                tree_smoothness: float = TREE_SMOOTHNESS) -> list[CaseResult]:
    """Segment every scan under ``input_path`` with ``model``; one result per case.

    ``min_component_mm3``: drop predicted components under this volume (mm^3); None: the
    model file's setting (``inference.vessel_mask``). ``liver_model``: a liver model file
    (``scripts/train_liver.sh``) run on every scan without ``liver_mask``; vessels farther than
    ``liver_margin_mm`` from its liver are removed (:func:`segment_case`; ``liver_refine``: its
    surface corrected by intensity); without one, the liver
    model embedded in ``model`` (``scripts/embed_liver.py``) is used unless ``use_embedded_liver``
    is False. ``tree_model``: a tree model file (``train_tree_model.py``) that labels a binary
    model's vessels with their trees (a label map, a surface and statistics per tree), cut with
    ``tree_smoothness`` (:func:`inference.trees.cut_trees`).

    Bad model files and inputs raise ValueError / FileNotFoundError before anything is written.
    With several scans, one that fails is reported (status "failed", a one-line message) and
    the others still run.
    """
    inp, out_resolved = Path(input_path).resolve(), Path(output).resolve()
    if inp.is_dir() and (out_resolved == inp or inp in out_resolved.parents):
        # the next run would read the masks written there as scans (and a series folder would
        # become a folder of NIfTI files)
        raise ValueError(f"{output}: the output folder must not be in the input folder {input_path}")
    cases = find_cases(input_path)
    if dicom_seg:
        nifti = [c for c in cases if c.kind == "nifti"]
        if nifti:
            raise ValueError(f"{nifti[0].path}: --dicom_seg needs a DICOM input (the segmentation references the "
                             f"source series); this is a NIfTI file")
    if liver_mask is not None and len(cases) > 1:
        raise ValueError(f"{input_path}: --liver_mask needs a single scan, found {len(cases)}")
    if liver_margin_mm < 0:
        raise ValueError(f"--liver_margin must be >= 0 mm, got {liver_margin_mm}")
    tree_smoothness = check_smoothness(tree_smoothness)
    seg = Predictor.from_checkpoint(model, device, head, min_component_mm3)
    if model_target(seg.ckpt) == "liver":
        raise ValueError(f"{seg.path}: this is a liver model; pass it as --liver_model and a vessel model as --model")
    liver_seg = None
    if liver_model is not None:
        liver_seg = Predictor.from_checkpoint(liver_model, device)
        check_target(liver_seg.ckpt, str(liver_seg.path), "liver")
        if liver_mask is not None:
            ignored = [o for o, off in (("--liver_margin", liver_margin_mm != DEFAULT_MARGIN_MM),
                                        ("--liver_refine 0", not liver_refine)) if off]
            if ignored:
                log.warning("--liver_mask given: the liver model is not run, and %s (its settings) do not apply",
                            " and ".join(ignored))
            else:
                log.info("--liver_mask given: the liver model is not run")
    elif liver_mask is None and use_embedded_liver:
        liver_seg = embedded_liver_model(seg.ckpt, seg.path, device)
        if liver_seg is not None:
            log.info("the liver model embedded in %s finds the liver", seg.path)
    if liver_seg is None and liver_margin_mm != DEFAULT_MARGIN_MM:
        log.warning("--liver_margin %g mm: no liver model runs (%s), so no margin applies", liver_margin_mm,
                    "--liver_mask is the region" if liver_mask is not None else "the whole scan is the region")
    if liver_seg is None and not liver_refine:
        log.warning("--liver_refine 0: no liver model runs (%s), so there is no liver mask to refine",
                    "--liver_mask is used as given" if liver_mask is not None else "the whole scan is the region")
    if tree_model is None and tree_smoothness != TREE_SMOOTHNESS:
        log.warning("--tree_smoothness %g: no tree model (--tree_model), so no tree labels to cut", tree_smoothness)
    trees = None
    if tree_model is not None:
        check_binary(tree_model, seg.path, seg.classes)
        trees = load_tree_model(tree_model, seg.device)
        warning = vessel_model_warning(trees, seg.sha256, seg.ckpt or {})
        if warning:
            log.warning("%s", warning)
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output exists and is not a folder")
    log.info("model %s (%d-D, salience %s%s) from %s; %d scan(s)", seg.ckpt["model_name"], seg.spatial_dims,
             seg.salience_mode,
             f", generator {seg.generator.name}" if seg.generator is not None else "", seg.path, len(cases))
    kw = dict(liver_mask=liver_mask, liver_model=liver_seg, liver_margin_mm=liver_margin_mm,
              liver_refine=liver_refine, prob=prob, mesh=mesh,
              figures=figures, graph=graph, dicom_seg=dicom_seg, tta=tta, series=series, batch_size=batch_size,
              overwrite=overwrite, tree_model=trees, tree_smoothness=tree_smoothness)
    if len(cases) == 1:
        return [segment_case(seg, cases[0], out_dir, **kw)]
    results = []
    with logging_redirect_tqdm():
        for src in tqdm(cases, desc="segmenting", unit="scan"):
            try:
                results.append(segment_case(seg, src, out_dir, **kw))
            except (PreprocessError, ValueError, FileNotFoundError, OSError, RuntimeError) as e:
                # RuntimeError: out of GPU memory on a large scan, a library that meets a shape it
                # cannot take; the other scans still run
                msg = " ".join(str(e).split()) or type(e).__name__
                msg = msg if msg.startswith(f"{src.name}:") else f"{src.name}: {msg}"  # which scan, once
                log.error("%s", msg)
                log.debug("%s failed", src.name, exc_info=True)
                results.append(CaseResult(src.name, "failed", message=msg))
    return results
