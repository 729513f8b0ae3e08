"""Per-case PNG figures (matplotlib, Agg backend: no display needed).

- ``<case>_overlay.png``: a few transverse slices through the vessels, the CT in grey with
  true positives (green), false positives (red) and false negatives (blue) on top; when the
  model used salience, the three salience channels of the same slice beside it.
- ``<case>_mip.png``: maximum intensity projections of prediction and truth side by side,
  axial (along D) and coronal (along rows), in mm proportions; with salience, its MIPs too.
- :func:`masks_figure`: several masks of the same slices against one truth, side by side
  (``bench/liver_bench.py --figure``: the liver model's mask before and after a refinement).

Arrays are (H, W, D) = (rows, columns, slices); spacing (row, col, slice) mm sets the pixel
aspect so vessels keep their shape on anisotropic grids.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from utils.atomic import atomic_path  # noqa: E402

COLOURS = {"TP": (0.1, 0.85, 0.1), "FP": (0.95, 0.1, 0.1), "FN": (0.15, 0.35, 1.0)}
PLANE_NAMES = ("transverse", "coronal", "sagittal")


def pick_slices(target: np.ndarray, n: int = 3) -> list[int]:
    """``n`` slice indices spread over the slices containing truth (quantiles), else over the volume."""
    d = target.shape[2]
    zs = np.flatnonzero(target.reshape(-1, d).any(axis=0))
    if zs.size == 0:
        zs = np.arange(d)
    q = np.quantile(zs, np.linspace(0.2, 0.8, n)) if n > 1 else [np.median(zs)]
    picked = sorted({int(zs[np.abs(zs - v).argmin()]) for v in q})
    return picked


def error_rgb(image2d: np.ndarray, pred2d: np.ndarray, target2d: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1]: grey image with TP / FP / FN painted in their colours."""
    g = np.clip(image2d.astype(np.float32), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=2)
    for name, m in (("TP", pred2d & target2d), ("FP", pred2d & ~target2d), ("FN", ~pred2d & target2d)):
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(COLOURS[name], dtype=np.float32)
    return rgb


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _finish(fig: plt.Figure, axes: np.ndarray, title: str, path: Path) -> None:
    """Axes off, the TP / FP / FN legend, the title; then save atomically."""
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.legend(handles=[Patch(color=COLOURS[k], label=k) for k in ("TP", "FP", "FN")], loc="lower center",
               ncol=3, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def overlay_figure(
    path: Path,
    image: np.ndarray,
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float],
    salience: Optional[np.ndarray] = None,
    n_slices: int = 3,
    title: str = "",
) -> Path:
    """Write the slice overlay PNG (see module docstring).

    salience: (3, H, W, D) (transverse, coronal, sagittal channels), (1, H, W, D) (a 2-D e2e
    model's transverse salience) or None.
    """
    pred, target = pred.astype(bool), target.astype(bool)
    zs = pick_slices(target, n_slices)
    nsal = 0 if salience is None else salience.shape[0]
    ncol = 1 + nsal
    aspect = spacing[0] / spacing[1]
    fig, axes = plt.subplots(len(zs), ncol, figsize=(3.6 * ncol, 3.6 * len(zs)), squeeze=False)
    for i, z in enumerate(zs):
        ax = axes[i, 0]
        ax.imshow(error_rgb(image[:, :, z], pred[:, :, z], target[:, :, z]), aspect=aspect, interpolation="nearest")
        ax.set_title(f"slice {z}", fontsize=9)
        if salience is not None:
            for c in range(nsal):
                a = axes[i, 1 + c]
                a.imshow(salience[c, :, :, z], cmap="magma", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
                a.set_title(f"salience {PLANE_NAMES[c]}, slice {z}", fontsize=9)
    _finish(fig, axes, title, path)
    return path


def masks_figure(path: Path, rows: Sequence[tuple[str, np.ndarray, dict[str, np.ndarray], np.ndarray]],
                 aspects: Sequence[float], title: str = "") -> Path:
    """Write a PNG comparing masks against one truth on one slice per row: each entry of ``rows`` =
    (row label, image (H, W) in [0, 1], {column label: mask (H, W)}, truth (H, W)), each column the
    slice's TP / FP / FN of one mask; ``aspects``: each row's pixel aspect (row / column spacing)."""
    if not rows or len(rows) != len(aspects):
        raise ValueError(f"one aspect per row, got {len(rows)} rows and {len(aspects)} aspects")
    ncol = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.6 * ncol, 3.6 * len(rows)), squeeze=False)
    for i, ((label, image, masks, target), aspect) in enumerate(zip(rows, aspects)):
        for j, (name, mask) in enumerate(masks.items()):
            if mask.shape != target.shape or image.shape != target.shape or target.ndim != 2:
                raise ValueError(f"{label} / {name}: image {image.shape}, mask {mask.shape} and truth "
                                 f"{target.shape} must be slices (H, W) of one shape")
            axes[i, j].imshow(error_rgb(image, mask.astype(bool), target.astype(bool)), aspect=aspect,
                              interpolation="nearest")
            axes[i, j].set_title(f"{label}: {name}", fontsize=9)
    _finish(fig, axes, title, path)
    return path


def mip_figure(
    path: Path,
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float],
    salience: Optional[np.ndarray] = None,
    title: str = "",
) -> Path:
    """Write the MIP PNG: rows axial / coronal, columns prediction, truth, error map (and salience)."""
    pred, target = pred.astype(bool), target.astype(bool)
    views = [
        # (name, projection of an (H, W, D) array, aspect of the projected image)
        ("axial MIP", lambda a: a.max(axis=2), spacing[0] / spacing[1]),
        ("coronal MIP", lambda a: a.max(axis=0).T, spacing[2] / spacing[1]),  # (D, W): slices run down
    ]
    ncol = 3 + (1 if salience is not None else 0)
    fig, axes = plt.subplots(2, ncol, figsize=(3.6 * ncol, 7.5), squeeze=False)
    for r, (name, proj, aspect) in enumerate(views):
        p, t = proj(pred), proj(target)
        axes[r, 0].imshow(p, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        axes[r, 0].set_title(f"prediction, {name}", fontsize=9)
        axes[r, 1].imshow(t, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        axes[r, 1].set_title(f"truth, {name}", fontsize=9)
        axes[r, 2].imshow(error_rgb(np.zeros(p.shape), p, t, alpha=1.0), aspect=aspect, interpolation="nearest")
        axes[r, 2].set_title(f"TP / FP / FN, {name}", fontsize=9)
        if salience is not None:
            axes[r, 3].imshow(proj(salience.mean(axis=0)), cmap="magma", vmin=0, vmax=1, aspect=aspect,
                              interpolation="nearest")
            axes[r, 3].set_title(f"mean salience, {name}", fontsize=9)
    _finish(fig, axes, title, path)
    return path


def graph_figure(path: Path, mask: np.ndarray, spacing: Sequence[float], graph, title: str = "") -> Path:
    """The branch graph drawn over the axial MIP of the mask: branches coloured by mean radius (mm),
    branch points as red dots, end points as small white ones.

    mask: bool (H, W, D); spacing (row, col, slice) mm; graph: an ``evaluation.graph.VesselGraph``
    whose paths are in index x spacing mm (``vessel_graph`` without ``to_patient``).
    """
    sp = np.asarray(spacing, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 7 * mask.shape[0] * sp[0] / max(mask.shape[1] * sp[1], 1e-6)))
    ax.imshow(mask.max(axis=2), cmap="gray", vmin=0, vmax=2.5, interpolation="nearest",
              extent=(0, mask.shape[1] * sp[1], mask.shape[0] * sp[0], 0))
    cmap = plt.get_cmap("viridis")
    top = max([b.mean_radius_mm for b in graph.branches] + [1.0])
    for b in graph.branches:
        ax.plot(b.path_mm[:, 1], b.path_mm[:, 0], color=cmap(b.mean_radius_mm / top), linewidth=1.2)
    for kind, colour, size in (("branch point", "red", 14), ("end point", "white", 5)):
        pts = np.array([v["position_mm"] for v in graph.nodes.values() if v["kind"] == kind]).reshape(-1, 3)
        ax.scatter(pts[:, 1], pts[:, 0], s=size, c=colour, edgecolors="none", label=f"{kind}s ({len(pts)})")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=ax, fraction=0.04, label="branch mean radius (mm)")
    ax.legend(loc="lower right", fontsize=7, facecolor="0.3", labelcolor="white")
    ax.set_xlabel("mm (columns)")
    ax.set_ylabel("mm (rows)")
    ax.set_title((title + "\n" if title else "") + f"{len(graph.branches)} branches over the axial MIP", fontsize=9)
    _save(fig, path)
    return path
