"""Does salience single out the (thin) vessels better than intensity and a classical filter?

    python bench/salience_quality.py --dataset phantom --root_path data --list_dir list [--split test]

For every case of the split: ROC-AUC, inside the liver mask, of vessel voxels against the
other liver voxels, for S_t, S_c, S_s and their mean from each generator (``bank`` with the
shipped head or ``--head``, ``fpn`` with the authors' weights when present, ``analytic``),
the raw intensity, and scikit-image's 3-D Frangi vesselness (bright ridges, sigmas 1-3
voxels). "Thin": only vessel voxels whose local radius is < 1.5 mm count as positives
(thicker vessel voxels are left out); the local radius of a vessel voxel is the distance
transform (mm) of the vessel mask at its nearest centreline (skeleton) voxel. The table
gives the mean over cases (and the number of cases).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata
from skimage.filters import frangi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.metrics import skeleton  # noqa: E402

from networks.salience import (  # noqa: E402
    AnalyticGenerator,
    BankGenerator,
    FPNGenerator,
    default_head_path,
    load_fpn,
    load_head,
    salience_3d,
)
from utils.h5io import DatasetPaths, read_list, read_volume  # noqa: E402

log = logging.getLogger("salience_quality")
SEED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / (
    "dice_best_Wavelet_square_net_vessel_data_size512.pth")
THIN_MM = 1.5


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC (ties count one half); NaN when a class is empty."""
    positive = positive.astype(bool)
    n1 = int(positive.sum())
    n0 = positive.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def local_radius_mm(vessel: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Per vessel voxel: the vessel's distance transform (mm) at the nearest skeleton voxel; 0 outside."""
    edt = ndimage.distance_transform_edt(vessel, sampling=spacing)
    skel = skeleton(vessel)
    if not skel.any():
        return np.where(vessel > 0, edt, 0.0)
    _, idx = ndimage.distance_transform_edt(~skel, sampling=spacing, return_indices=True)
    radius = edt[tuple(idx)]
    return np.where(vessel > 0, radius, 0.0)


def evaluate_case(label: np.ndarray, liver: np.ndarray, spacing, maps: dict) -> dict:
    """AUCs for every map in ``maps`` (name -> (H, W, D) array): {name: (overall, thin)}."""
    inside = liver > 0
    vessel = (label > 0) & inside
    radius = local_radius_mm(label > 0, spacing)
    thin = vessel & (radius < THIN_MM)
    keep_thin = inside & ~(vessel & ~thin)  # thin vessels vs non-vessel liver
    out = {}
    for name, m in maps.items():
        out[name] = (roc_auc(m[inside], vessel[inside]), roc_auc(m[keep_thin], thin[keep_thin]))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="phantom")
    p.add_argument("--root_path", default="data")
    p.add_argument("--list_dir", default="list")
    p.add_argument("--split", default="test")
    p.add_argument("--head", default=str(default_head_path()), help="bank head checkpoint")
    p.add_argument("--fpn_weights", default=str(SEED_WEIGHTS))
    p.add_argument("--max_cases", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = DatasetPaths.of(args.root_path, args.dataset, args.list_dir)
    try:
        cases = read_list(paths.list_file(f"vol_{args.split}"))
    except FileNotFoundError as e:
        log.error("%s", e)
        return 1
    if args.max_cases > 0:
        cases = cases[: args.max_cases]
    generators = {"bank": BankGenerator(load_head(args.head)), "analytic": AnalyticGenerator()}
    if Path(args.fpn_weights).is_file():
        generators["fpn"] = FPNGenerator(load_fpn(args.fpn_weights))
    else:
        log.warning("fpn weights %s absent: fpn row skipped", args.fpn_weights)
    rows: dict[str, list[dict]] = {}
    for case in cases:
        vol = read_volume(paths.volume(case))
        if vol.liver is None:
            log.warning("%s: no liver mask, skipped", case)
            continue
        maps = {}
        for name, gen in generators.items():
            t0 = time.perf_counter()
            s = salience_3d(vol.image, gen)
            for i, plane in enumerate(("S_t", "S_c", "S_s")):
                maps[f"{name}:{plane}"] = s[i]
            maps[f"{name}:mean"] = s.mean(0)
            log.info("%s %s: %.1f s", case, name, time.perf_counter() - t0)
        maps["intensity:mean"] = vol.image
        t0 = time.perf_counter()
        maps["frangi:mean"] = frangi(vol.image, sigmas=(1, 1.5, 2, 3), black_ridges=False)
        log.info("%s frangi: %.1f s", case, time.perf_counter() - t0)
        res = evaluate_case(vol.label, vol.liver, vol.spacing, maps)
        for key, val in res.items():
            rows.setdefault(key, []).append({"overall": val[0], "thin": val[1]})
    n = len(next(iter(rows.values()))) if rows else 0
    print(f"\nROC-AUC inside the liver, vessel vs other liver voxels; {args.dataset} {args.split} split, "
          f"mean over {n} case(s); thin = local radius < {THIN_MM} mm\n")
    print("| map | S_t | S_c | S_s | mean | thin S_t | thin S_c | thin S_s | thin mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = [g for g in ("bank", "fpn", "analytic") if g in generators] + ["intensity", "frangi"]
    for g in names:
        cells_o, cells_t = [], []
        for plane in ("S_t", "S_c", "S_s", "mean"):
            vals = rows.get(f"{g}:{plane}")
            cells_o.append("-" if vals is None else f"{np.nanmean([v['overall'] for v in vals]):.3f}")
            cells_t.append("-" if vals is None else f"{np.nanmean([v['thin'] for v in vals]):.3f}")
        print(f"| {g} | " + " | ".join(cells_o + cells_t) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
