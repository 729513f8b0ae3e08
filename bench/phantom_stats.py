"""Phantoms beside real CT: the same figures, measured by the same code, side by side.

    python bench/phantom_stats.py [--presets demo full] [--cases 12 2] [--workers 2]
                                  [--real ../shared/real] [--repeats 1] [--grid_mm MM]

Every patient, real or phantom, is read with the project's DICOM reader
(``preprocessing.dicom_reader.read_dicom_patient``, labels portalvein + venoussystem,
rescale applied), optionally resampled in-plane to ``--grid_mm`` (the grid a model trained
with ``--target_spacing`` sees), then measured by :func:`volume_figures` inside its liver mask:

* parenchyma: the liver eroded by 2 voxels minus every vessel (label and artery) dilated by
  2 voxels; its mean and std in HU;
* noise: the std of the high-pass image (HU minus its in-plane Gaussian smoothing, sigma
  2 voxels) in the parenchyma, and its correlation length: the in-plane lag (voxels, linear
  interpolation, mean of the row and column directions) at which the high-pass image's
  autocorrelation inside the parenchyma falls to 1/e (white noise: about 0.6 voxel);
* vessel contrast by radius: mean HU of the label voxels inside the liver whose local
  radius (the label's distance transform, mm, at the nearest skeleton voxel) is in a bin,
  minus the parenchyma mean;
* edge / core contrast: the contrast of the label's outer in-plane voxel layer over that of
  its voxels two or more layers deep, for vessels of local radius >= 1.5 mm: how far out
  into the blurred rim a label reaches (1: a flat lumen labelled to its edge);
* radius percentiles 10/50/90 (mm): the label's distance transform at its skeleton voxels
  inside the liver (a real label also holds the extrahepatic veins: portal trunk, splenic and
  mesenteric veins, vena cava, 4-10 mm thick, which phantoms do not draw and no metric scores);
  the same percentiles "(area)" from the cross-section area per centreline length
  (:func:`centreline_radius_mm`), which does not step with the voxel size;
* vessel share of the liver (%): label voxels inside the liver / liver voxels;
* intensity AUC: ROC-AUC of the raw HU for label vs other liver voxels;
* portal share by height (%): the portal vein's share of the two trees' voxels (portalvein,
  venoussystem) inside the liver, in the lower, middle and upper third of the liver's slices
  (LPS order: feet to head). A tree model (issue 26) may tell the trees apart by height
  where the phantoms draw them apart by height;
* portal share by side (%): the same in thirds of the liver's columns, the patient's right,
  middle and left (where a real liver's left lobe takes the portal vein's left branch).

The table gives each preset's mean over its patients, each real patient, the real mean,
and whether a preset is within 15 % of the real mean (0.03 for the AUC, the calibration
target of issue 12). The make_phantoms wall time is the median of ``--repeats`` runs
(target: 12 demo patients in < 60 s with 2 workers on an idle machine).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.salience_quality import REAL_PATIENTS, REAL_ROOT, centreline_fields, local_radius_mm, roc_auc  # noqa: E402
from dataloaders.transforms import resize_planes, spacing_size  # noqa: E402
from phantom.generator import make_phantoms  # noqa: E402
from preprocessing.dicom_reader import read_dicom_patient  # noqa: E402
from preprocessing.pipeline import DEFAULT_VESSELS  # noqa: E402
from utils.logging_setup import setup_logging  # noqa: E402
from utils.records import new_record_arg  # noqa: E402

log = logging.getLogger("phantom_stats")

BINS = ((0.0, 1.0), (1.0, 1.5), (1.5, 2.5), (2.5, 4.0), (4.0, np.inf))
BIN_NAMES = ("<1", "1-1.5", "1.5-2.5", "2.5-4", ">=4")
REL_TOL, AUC_TOL = 0.15, 0.03
HIGHPASS_SIGMA_VOX = 2.0
MAX_LAG = 6
WINDOW_MM = 4.0
THIRDS = ("lower", "middle", "upper")
SIDES = ("right", "middle", "left")
TREES = ("portalvein", "venoussystem")


def figure_names() -> list[str]:
    """The figures of :func:`volume_figures`, :func:`height_shares` and :func:`side_shares`, in
    table order."""
    return (["parenchyma mean HU", "parenchyma std HU", "noise HU", "noise corr. length vox"]
            + [f"contrast r {b} mm HU" for b in BIN_NAMES] + ["edge / core contrast"]
            + ["radius p10 mm", "radius p50 mm", "radius p90 mm"]
            + ["radius p10 mm (area)", "radius p50 mm (area)", "radius p90 mm (area)"]
            + ["vessel share of liver %", "intensity AUC"] + [f"portal share, {t} third %" for t in THIRDS]
            + [f"portal share, {t} side %" for t in SIDES])


def correlation_length(highpass: np.ndarray, mask: np.ndarray, max_lag: int = MAX_LAG) -> float:
    """Lag (voxels) at which the in-plane autocorrelation of ``highpass`` (H, W, D) inside
    ``mask`` falls to 1/e, mean over the row and column directions; ``max_lag`` if it never does."""
    x = np.where(mask, highpass - highpass[mask].mean(), 0.0).astype(np.float64)
    m = mask.astype(np.float64)
    var = float((x * x).sum() / m.sum())
    lengths = []
    for axis in (0, 1):
        acf = [1.0]
        for lag in range(1, max_lag + 1):
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[axis], b[axis] = slice(lag, None), slice(None, -lag)
            n = float((m[tuple(a)] * m[tuple(b)]).sum())
            acf.append(float((x[tuple(a)] * x[tuple(b)]).sum() / max(n, 1.0)) / var)
        acf = np.asarray(acf)
        below = np.flatnonzero(acf < np.exp(-1.0))
        if below.size == 0:
            lengths.append(float(max_lag))
            continue
        k = int(below[0])
        lengths.append(k - 1 + (acf[k - 1] - np.exp(-1.0)) / (acf[k - 1] - acf[k]))
    return float(np.mean(lengths))


def centreline_radius_mm(label: np.ndarray, spacing, window_mm: float = WINDOW_MM,
                         fields: Optional[tuple] = None) -> tuple[np.ndarray, np.ndarray]:
    """Radius (mm) along the label's centreline from its cross-section area, not its distance
    transform: r = sqrt(V / (pi L)), with V the label volume (mm^3) whose nearest centreline
    voxel lies within a ``window_mm`` box of a centreline voxel and L the centreline length
    (mm) in that box.

    The distance transform at the skeleton counts whole voxels to the nearest background
    voxel: on a 0.9 x 0.9 x 1.6 mm grid it reads 0.9, 1.27 or 1.6 mm for any vessel thinner
    than about 1.3 mm, whatever its calibre (the slice spacing is the median radius of both
    real patients). Area over length averages those steps out, so labels on different grids
    can be compared. ``label`` (H, W, D) mask, spacing mm (row, col, slice); ``fields``: its
    :func:`~bench.salience_quality.centreline_fields` when already computed. Returns (skeleton
    (H, W, D) bool, radius (H, W, D) float: NaN off the skeleton or where the box holds no
    centreline length).
    """
    label = np.asarray(label) > 0
    spacing = np.asarray(spacing, dtype=np.float64)
    if label.ndim != 3 or spacing.shape != (3,):
        raise ValueError(f"centreline_radius_mm needs a (H, W, D) mask and 3 spacings, got {label.shape} / {tuple(spacing)}")
    _, skel, idx = fields if fields is not None else centreline_fields(label, spacing)
    radius = np.full(label.shape, np.nan)
    if idx is None:
        return skel, radius
    owner = np.ravel_multi_index(tuple(i[label] for i in idx), label.shape)
    volume = np.bincount(owner, minlength=label.size).reshape(label.shape) * float(np.prod(spacing))
    # length: half the step (mm) to every 26-neighbour on the skeleton, summed per voxel
    length = np.zeros(label.shape)
    padded = np.pad(skel, 1)
    n0, n1, n2 = label.shape
    for o in np.ndindex(3, 3, 3):
        if o == (1, 1, 1):
            continue
        step = float(np.linalg.norm((np.asarray(o) - 1) * spacing))
        length += (skel & padded[o[0]:o[0] + n0, o[1]:o[1] + n1, o[2]:o[2] + n2]) * (step / 2.0)
    size = [max(1, 2 * int(round(window_mm / 2.0 / s)) + 1) for s in spacing]
    vol_w = ndimage.uniform_filter(volume, size=size, mode="constant")
    len_w = ndimage.uniform_filter(length, size=size, mode="constant")
    ok = skel & (len_w > 1e-9)
    radius[ok] = np.sqrt(vol_w[ok] / (np.pi * len_w[ok]))
    return skel, radius


def volume_figures(hu: np.ndarray, label: np.ndarray, liver: np.ndarray, spacing, other_vessels: Optional[np.ndarray] = None) -> dict[str, float]:
    """The calibration figures of one patient (see the module docstring).

    ``hu`` float (H, W, D) HU; ``label``, ``liver``, ``other_vessels`` (H, W, D) masks (vessels
    not in the label, e.g. the artery: left out of the parenchyma); spacing mm (row, col, slice).
    Everything is cropped to the liver's bounding box first. Raises ValueError on shape mismatch
    or an empty liver.
    """
    if label.shape != hu.shape or liver.shape != hu.shape:
        raise ValueError(f"image {hu.shape}, label {label.shape} and liver {liver.shape} differ in shape")
    liver = liver > 0
    if not liver.any():
        raise ValueError("empty liver mask")
    box = tuple(slice(max(0, int(i.min()) - 3), int(i.max()) + 4) for i in np.nonzero(liver))
    hu, liver, label = hu[box].astype(np.float32), liver[box], label[box] > 0
    vessels = label | (other_vessels[box] > 0 if other_vessels is not None else False)
    par = ndimage.binary_erosion(liver, iterations=2) & ~ndimage.binary_dilation(vessels, iterations=2)
    out = {"parenchyma mean HU": float(hu[par].mean()), "parenchyma std HU": float(hu[par].std())}
    highpass = hu - ndimage.gaussian_filter(hu, sigma=(HIGHPASS_SIGMA_VOX, HIGHPASS_SIGMA_VOX, 0))
    out["noise HU"] = float(highpass[par].std())
    out["noise corr. length vox"] = correlation_length(highpass, par)
    vessel = label & liver
    fields = centreline_fields(label, spacing)  # one distance transform and skeleton for every radius
    radius = local_radius_mm(label, spacing, fields)
    for (lo, hi), name in zip(BINS, BIN_NAMES):
        sel = vessel & (radius >= lo) & (radius < hi)
        out[f"contrast r {name} mm HU"] = float(hu[sel].mean()) - out["parenchyma mean HU"] if sel.any() else float("nan")
    plane = np.zeros((3, 3, 3), bool)
    plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    inner = ndimage.binary_erosion(label, plane)
    thick = vessel & (radius >= 1.5)
    edge, core = thick & ~inner, thick & ndimage.binary_erosion(inner, plane)
    out["edge / core contrast"] = (float((hu[edge].mean() - out["parenchyma mean HU"])
                                         / (hu[core].mean() - out["parenchyma mean HU"]))
                                   if edge.any() and core.any() else float("nan"))
    edt = fields[0]
    skel, r_area = centreline_radius_mm(label, spacing, fields=fields)
    r_skel = edt[skel & liver]
    for q, v in zip((10, 50, 90), np.percentile(r_skel, [10, 50, 90]) if r_skel.size else [np.nan] * 3):
        out[f"radius p{q} mm"] = float(v)
    r_area = r_area[skel & liver]
    r_area = r_area[np.isfinite(r_area)]
    for q, v in zip((10, 50, 90), np.percentile(r_area, [10, 50, 90]) if r_area.size else [np.nan] * 3):
        out[f"radius p{q} mm (area)"] = float(v)
    out["vessel share of liver %"] = 100.0 * float(vessel.sum()) / float(liver.sum())
    out["intensity AUC"] = roc_auc(hu[liver], vessel[liver])
    return out


def height_shares(portal: np.ndarray, hepatic: np.ndarray, liver: np.ndarray) -> dict[str, float]:
    """The portal share (%) of the two trees' voxels inside the liver in each third of the liver's
    slices (its first to its last, along the slice axis); ``portal``, ``hepatic``, ``liver``
    (H, W, D) masks that do not overlap (a class map's two classes). NaN for a third without
    vessels (the table's mean over a set's patients leaves it out); ValueError on shape
    mismatch or an empty liver."""
    return _shares_along(portal, hepatic, liver, 2, THIRDS, "third")


def side_shares(portal: np.ndarray, hepatic: np.ndarray, liver: np.ndarray) -> dict[str, float]:
    """As :func:`height_shares`, in thirds of the liver's columns: the patient's right, middle
    and left (the column index runs to the patient's left, as the DICOM reader keeps it), where
    a real liver's left lobe takes its own branch of the portal vein."""
    return _shares_along(portal, hepatic, liver, 1, SIDES, "side")


def _shares_along(portal: np.ndarray, hepatic: np.ndarray, liver: np.ndarray, axis: int,
                  names: Sequence[str], what: str) -> dict[str, float]:
    """The portal share (%) in ``len(names)`` equal parts of the liver's extent along ``axis``."""
    if not (portal.shape == hepatic.shape == liver.shape) or liver.ndim != 3:
        raise ValueError(f"portal {portal.shape}, hepatic {hepatic.shape} and liver {liver.shape} must be one (H, W, D) shape")
    others = tuple(a for a in range(3) if a != axis)
    idx = np.flatnonzero((liver > 0).any(axis=others))
    if idx.size == 0:
        raise ValueError("empty liver mask")
    p_a = ((portal > 0) & (liver > 0)).sum(axis=others)
    h_a = ((hepatic > 0) & (liver > 0)).sum(axis=others)
    out = {}
    for name, part in zip(names, np.array_split(np.arange(idx[0], idx[-1] + 1), len(names))):
        p, h = float(p_a[part].sum()), float(h_a[part].sum())
        out[f"portal share, {name} {what} %"] = 100.0 * p / (p + h) if p + h > 0 else float("nan")
    return out


def to_grid(hu: np.ndarray, masks: list[Optional[np.ndarray]], spacing, grid_mm: float
            ) -> tuple[np.ndarray, list[Optional[np.ndarray]], tuple[float, float, float]]:
    """Resample a patient in-plane to ``grid_mm`` mm per pixel with the 2-D pipeline's own
    geometry (``resize_planes``: bilinear, antialiased where it shrinks; slices untouched),
    so the figures are those of the grid a ``--target_spacing`` model sees. ``hu`` and every
    mask are (H, W, D); a mask is resized as a soft label and kept where >= 0.5 (None stays
    None). Returns (HU, masks, spacing (grid_mm, grid_mm, slice mm))."""
    if any(m is not None and m.shape != hu.shape for m in masks):
        raise ValueError(f"masks {[None if m is None else m.shape for m in masks]} differ from the image {hu.shape}")
    size = spacing_size(hu.shape[:2], spacing, grid_mm)
    chans = [hu.astype(np.float32)] + [m.astype(np.float32) for m in masks if m is not None]
    planes = torch.from_numpy(np.stack(chans)).permute(3, 0, 1, 2)  # (D, C, H, W)
    out = resize_planes(planes, size).permute(1, 2, 3, 0).numpy()   # (C, H', W', D)
    it = iter(out[1:])
    resized = [None if m is None else next(it) >= 0.5 for m in masks]
    return np.ascontiguousarray(out[0]), resized, (float(grid_mm), float(grid_mm), float(spacing[2]))


def patient_figures(patient_dir: Path, keep_slice: bool = False, grid_mm: Optional[float] = None) -> dict:
    """Read a 3D-IRCADb-style patient with the project's reader and measure it, on its own
    grid or, with ``grid_mm``, resampled in-plane to that many mm per pixel (:func:`to_grid`).
    The figures are :func:`volume_figures`', :func:`height_shares`' and :func:`side_shares`' (the
    class map's trees).
    With ``keep_slice``, ``"_slice"`` holds (HU (H, W) of the slice with most label voxels,
    liver (H, W), spacing) for the side-by-side figure."""
    # one read: the class map numbers the trees in TREES' order (1 portal vein, 2 hepatic veins)
    # and the artery 3 where no tree claims it, which leaves label | artery as it is
    data = read_dicom_patient(patient_dir, DEFAULT_VESSELS, classes=TREES + ("artery",))
    if data.label is None or data.liver is None:
        raise ValueError(f"{patient_dir}: no vessel label or liver mask")
    hu, label, liver, spacing = data.hu, data.label, data.liver, data.spacing
    portal, hepatic, artery = (data.classes == k for k in (1, 2, 3))
    if grid_mm:
        hu, (label, liver, artery, portal, hepatic), spacing = to_grid(hu, [label, liver, artery, portal, hepatic],
                                                                       spacing, grid_mm)
    out: dict = volume_figures(hu, label, liver, spacing, other_vessels=artery)
    out.update(height_shares(portal, hepatic, liver))
    out.update(side_shares(portal, hepatic, liver))
    if keep_slice:
        k = int(np.argmax((label & liver).sum(axis=(0, 1))))
        out["_slice"] = (hu[:, :, k].copy(), liver[:, :, k] > 0, spacing)
    return out


def draw_side_by_side(panels: dict[str, tuple], path: Path, zoom_mm: float = 110.0) -> None:
    """PNG: for every (name -> (HU (H, W), liver (H, W), spacing)) the whole slice (top,
    in mm, window -160..240 HU) and a ``zoom_mm`` square around the liver's centre (bottom,
    window 40..240 HU, the vessel range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.atomic import atomic_path

    fig, axes = plt.subplots(2, len(panels), figsize=(3.4 * len(panels), 7.0), squeeze=False)
    for j, (name, (hu, liver, sp)) in enumerate(panels.items()):
        h, w = hu.shape
        axes[0, j].imshow(hu, cmap="gray", vmin=-160, vmax=240, extent=(0, w * sp[1], h * sp[0], 0))
        axes[0, j].set_title(f"{name}\n{h}x{w} px, {sp[0]:.2f} mm", fontsize=9)
        rc = np.argwhere(liver).mean(axis=0) if liver.any() else np.array([h / 2, w / 2])
        half = zoom_mm / 2
        r0, c0 = int(max(0, rc[0] - half / sp[0])), int(max(0, rc[1] - half / sp[1]))
        r1, c1 = int(min(h, rc[0] + half / sp[0])), int(min(w, rc[1] + half / sp[1]))
        axes[1, j].imshow(hu[r0:r1, c0:c1], cmap="gray", vmin=40, vmax=240,
                          extent=(c0 * sp[1], c1 * sp[1], r1 * sp[0], r0 * sp[0]))
        axes[1, j].set_title(f"liver, {zoom_mm:.0f} mm square", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("phantom vs real CT: the slice with the most vessel voxels (top: whole slice; bottom: same mm scale)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def phantom_set(preset: str, cases: int, workers: int, seed: int, repeats: int, tmp: Path) -> tuple[list[Path], list[float]]:
    """Generate ``cases`` patients ``repeats`` times (timed); the first run's folders and the wall times."""
    walls = []
    for r in range(max(1, repeats)):
        out = tmp / f"{preset}_{r}"
        t0 = time.perf_counter()
        dirs = make_phantoms(out, cases, preset, seed, workers=workers)
        walls.append(time.perf_counter() - t0)
        if r == 0:
            first = dirs
    return first, walls


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def within(value: float, target: float, key: str) -> bool:
    """The issue-12 calibration rule: AUC within 0.03, every other figure within 15 %."""
    if not (np.isfinite(value) and np.isfinite(target)):
        return False
    if key == "intensity AUC":
        return abs(value - target) <= AUC_TOL
    return abs(value - target) <= REL_TOL * abs(target)


def format_table(columns: dict[str, list[dict]], real_cols: list[str]) -> str:
    """Markdown table: one row per figure, a column per set (mean over its patients), the real
    mean, and for every phantom set whether it is within tolerance of the real mean."""
    keys = figure_names()
    phantoms = [c for c in columns if c not in real_cols]
    hdr = ["figure"] + [f"{c} (n={len(columns[c])})" for c in columns] + (["real mean"] if real_cols else [])
    hdr += [f"{c} ok" for c in phantoms] if real_cols else []
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for k in keys:
        vals = [_mean(columns[c], k) for c in columns]
        cells = [f"{v:.3f}" if k == "intensity AUC" else f"{v:.2f}" for v in vals]
        if real_cols:
            rm = float(np.mean([_mean(columns[c], k) for c in real_cols]))
            cells.append(f"{rm:.3f}" if k == "intensity AUC" else f"{rm:.2f}")
            cells += ["yes" if within(_mean(columns[c], k), rm, k) else "NO" for c in phantoms]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["demo", "full"])
    p.add_argument("--cases", type=int, nargs="+", default=[12, 2], help="patients per preset (one value, or one per preset)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed make_phantoms runs per preset (median reported)")
    p.add_argument("--real", type=Path, default=REAL_ROOT, help="folder holding the real 3D-IRCADb patients")
    p.add_argument("--grid_mm", type=float, default=None,
                   help="measure every patient resampled in-plane to this many mm per pixel (the grid a "
                        "--target_spacing model sees; the demo trains at 0.9); default: each on its own grid")
    p.add_argument("--figure", type=Path, default=None, help="write the side-by-side PNG here (e.g. imgs/phantom_vs_real.png)")
    p.add_argument("--record", type=new_record_arg, default=None, metavar="NAME",
                   help="also write results/NAME.json (utils.records)")
    a = p.parse_args(argv)
    setup_logging(logging.WARNING)
    cases = a.cases * len(a.presets) if len(a.cases) == 1 else a.cases
    if len(cases) != len(a.presets):
        p.error("--cases takes one value or one per preset")
    columns: dict[str, list[dict]] = {}
    timing = {}
    with tempfile.TemporaryDirectory(prefix="phantom_stats_") as tmp:
        for preset, n in zip(a.presets, cases):
            dirs, walls = phantom_set(preset, n, a.workers, a.seed, a.repeats, Path(tmp))
            timing[preset] = (n, walls)
            columns[f"phantom {preset}"] = [patient_figures(d, keep_slice=(i == 0), grid_mm=a.grid_mm) for i, d in enumerate(dirs)]
    real_cols = []
    for name in REAL_PATIENTS:
        d = a.real / name
        if not d.is_dir():
            log.warning("%s absent: real column skipped", d)
            continue
        columns[f"real {name.split('.')[-1]}"] = [patient_figures(d, keep_slice=True, grid_mm=a.grid_mm)]
        real_cols.append(f"real {name.split('.')[-1]}")
    print(f"\n# Phantoms beside real CT (seed {a.seed}); mean over patients; ok = within {REL_TOL:.0%} of the real "
          f"mean ({AUC_TOL} for the AUC); "
          + (f"every patient resampled in-plane to {a.grid_mm} mm per pixel" if a.grid_mm else "each patient on its own grid"))
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end (shared with other work)\n")
    print(format_table(columns, real_cols))
    if a.figure is not None:
        order = real_cols + [c for c in columns if c not in real_cols]
        draw_side_by_side({c: columns[c][0]["_slice"] for c in order}, a.figure)
        print(f"\nfigure: {a.figure}")
    for preset, (n, walls) in timing.items():
        print(f"\nmake_phantoms {preset}: {n} patients, {a.workers} workers: median {statistics.median(walls):.1f} s over "
              f"{len(walls)} run(s) ({', '.join(f'{w:.1f}' for w in walls)})")
    if a.record:
        from utils.records import write_record

        table = format_table(columns, real_cols).splitlines()
        path = write_record(a.record, {"table_markdown": table, "patients": {c: len(v) for c, v in columns.items()},
                                       "make_phantoms_seconds": {p_: statistics.median(w) for p_, (_, w) in
                                                                 timing.items()}},
                            description="phantom figures beside real CT, inside the liver (mean over patients); ok = "
                                        f"within {REL_TOL:.0%} of the real mean ({AUC_TOL} for the AUC)",
                            inputs={"presets": a.presets, "cases": cases, "seed": a.seed, "grid_mm": a.grid_mm,
                                    "real": real_cols})
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
