"""Does salience single out the (thin) vessels better than intensity and a classical filter?

    python bench/salience_quality.py --dataset phantom --root_path data --list_dir list [--split test]
    python bench/salience_quality.py --real [PATIENT_DIR ...] [--real_spacing MM] [--no_frangi]

For every case of the split: ROC-AUC, inside the liver mask, of vessel voxels against the
other liver voxels, for S_t, S_c, S_s and their mean from each generator (``bank`` with the
shipped head or ``--head``, ``fpn`` with the authors' weights when present, ``analytic``),
the raw intensity, and scikit-image's 3-D Frangi vesselness (bright ridges, sigmas 1-3
voxels). "Thin": only vessel voxels whose local radius is < 1.5 mm count as positives
(thicker vessel voxels are left out); the local radius of a vessel voxel is the distance
transform (mm) of the vessel mask at its nearest centreline (skeleton) voxel. The table
gives the mean over cases (and the number of cases). ``--real`` runs on real 3D-IRCADb
patients (default: 3Dircadb1.1 and 3Dircadb1.7 of ``../shared/real``) read with the
project's DICOM reader, windowed as preprocessing stores them and cropped to the liver's
box (plus ``--real_margin`` voxels), as training crops them. AUCs are taken inside the liver,
but the crop is not only a saving: under ``--normalisation volume`` and for ``fpn`` each
coronal and sagittal plane is standardised over the crop and the map min-max normalised over
it, so whole slices give other AUCs (docs/BENCHMARKS.md records both).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata
from skimage.filters import frangi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.records import run_recorded  # noqa: E402

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
from preprocessing.dicom_reader import read_dicom_patient  # noqa: E402
from preprocessing.pipeline import DEFAULT_VESSELS, to_volume  # noqa: E402
from utils.h5io import DatasetPaths, read_list, read_volume  # noqa: E402

log = logging.getLogger("salience_quality")
SEED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / (
    "dice_best_Wavelet_square_net_vessel_data_size512.pth")
THIN_MM = 1.5
REAL_ROOT = Path(__file__).resolve().parents[2] / "shared" / "real"
REAL_PATIENTS = ("3Dircadb1.1", "3Dircadb1.7")


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC (ties count one half); NaN when a class is empty."""
    positive = positive.astype(bool)
    n1 = int(positive.sum())
    n0 = positive.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def centreline_fields(vessel: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The vessel mask's (H, W, D) distance transform (mm), its skeleton (bool) and, for every
    voxel, the index (3, H, W, D) of its nearest skeleton voxel (None when the skeleton is
    empty): computed once, shared by every radius measure."""
    vessel = np.asarray(vessel) > 0
    edt = ndimage.distance_transform_edt(vessel, sampling=spacing)
    skel = skeleton(vessel)
    idx = ndimage.distance_transform_edt(~skel, sampling=spacing, return_indices=True)[1] if skel.any() else None
    return edt, skel, idx


def local_radius_mm(vessel: np.ndarray, spacing: tuple[float, float, float],
                    fields: Optional[tuple] = None) -> np.ndarray:
    """Per vessel voxel: the vessel's distance transform (mm) at the nearest skeleton voxel; 0 outside.
    ``fields``: :func:`centreline_fields` of ``vessel`` when already computed."""
    edt, _, idx = fields if fields is not None else centreline_fields(vessel, spacing)
    radius = edt if idx is None else edt[tuple(idx)]
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


def real_cases(patient_dirs: list[Path], spacing_mm: float, margin: int) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, tuple]]:
    """Real 3D-IRCADb patients read with the project's reader and windowed as preprocessing
    stores them (``to_volume``: clip(HU, 0, 400) / 400), cropped to the liver's box grown by
    ``margin`` voxels; with ``spacing_mm`` > 0 resampled in-plane to that many mm per pixel
    (image linear, masks nearest). Yields (name, image, label, liver, spacing), (H, W, D) each."""
    for d in patient_dirs:
        data = read_dicom_patient(d, DEFAULT_VESSELS)
        if data.label is None or data.liver is None:
            log.warning("%s: no vessel label or liver mask, skipped", d)
            continue
        vol = to_volume(data, "liver_box", margin)
        image, label, liver, sp = vol.image, vol.label, vol.liver, tuple(vol.spacing)
        if spacing_mm > 0:
            f = (sp[0] / spacing_mm, sp[1] / spacing_mm, 1.0)
            image = ndimage.zoom(image, f, order=1)
            label, liver = ndimage.zoom(label, f, order=0), ndimage.zoom(liver, f, order=0)
            sp = (spacing_mm, spacing_mm, sp[2])
        yield d.name, image, label, liver, sp


def dataset_cases(args) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, tuple]]:
    """The split's cases of a preprocessed dataset: (name, image, label, liver, spacing)."""
    paths = DatasetPaths.of(args.root_path, args.dataset, args.list_dir)
    cases = read_list(paths.list_file(f"vol_{args.split}"))
    if args.max_cases > 0:
        cases = cases[: args.max_cases]
    for case in cases:
        vol = read_volume(paths.volume(case))
        if vol.liver is None:
            log.warning("%s: no liver mask, skipped", case)
            continue
        yield case, vol.image, vol.label, vol.liver, vol.spacing


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="phantom")
    p.add_argument("--root_path", default="data")
    p.add_argument("--list_dir", default="list")
    p.add_argument("--split", default="test")
    p.add_argument("--real", type=Path, nargs="*", default=None,
                   help="real 3D-IRCADb patient folders instead of a dataset split (no value: "
                        f"{', '.join(REAL_PATIENTS)} of {REAL_ROOT})")
    p.add_argument("--real_spacing", type=float, default=0.0,
                   help="resample real patients in-plane to this many mm per pixel (0: native)")
    p.add_argument("--real_margin", type=int, default=16, help="voxels kept around the liver's box")
    p.add_argument("--head", default=str(default_head_path()), help="bank head checkpoint")
    p.add_argument("--fpn_weights", default=str(SEED_WEIGHTS))
    p.add_argument("--max_cases", type=int, default=0)
    p.add_argument("--generators", nargs="+", default=["bank", "fpn", "analytic"], choices=["bank", "fpn", "analytic"])
    p.add_argument("--no_frangi", action="store_true", help="skip the Frangi row (slow on real volumes)")
    p.add_argument("--normalisation", default="volume", choices=("volume", "fixed"),
                   help="the bank generator's normalisation rule (docs/DESIGN.md section 1a)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.real is not None:
        dirs = args.real or [REAL_ROOT / n for n in REAL_PATIENTS]
        missing = [str(d) for d in dirs if not Path(d).is_dir()]
        if missing:
            log.error("real patient folder(s) not found: %s", ", ".join(missing))
            return 1
        source = real_cases([Path(d) for d in dirs], args.real_spacing, args.real_margin)
        where = f"real patients {', '.join(Path(d).name for d in dirs)}" + (
            f" at {args.real_spacing} mm in-plane" if args.real_spacing > 0 else " at their own spacing")
    else:
        try:
            read_list(DatasetPaths.of(args.root_path, args.dataset, args.list_dir).list_file(f"vol_{args.split}"))
        except FileNotFoundError as e:
            log.error("%s", e)
            return 1
        source = dataset_cases(args)
        where = f"{args.dataset} {args.split} split"
    generators = {}
    if "bank" in args.generators:
        generators["bank"] = BankGenerator(load_head(args.head)).with_normalisation(args.normalisation)
    if "analytic" in args.generators:
        generators["analytic"] = AnalyticGenerator()
    if "fpn" in args.generators and Path(args.fpn_weights).is_file():
        generators["fpn"] = FPNGenerator(load_fpn(args.fpn_weights))
    elif "fpn" in args.generators:
        log.warning("fpn weights %s absent: fpn row skipped", args.fpn_weights)
    rows: dict[str, list[dict]] = {}
    for case, image, label, liver, spacing in source:
        maps = {}
        for name, gen in generators.items():
            t0 = time.perf_counter()
            s = salience_3d(image, gen)
            for i, plane in enumerate(("S_t", "S_c", "S_s")):
                maps[f"{name}:{plane}"] = s[i]
            maps[f"{name}:mean"] = s.mean(0)
            log.info("%s %s: %.1f s", case, name, time.perf_counter() - t0)
        maps["intensity:mean"] = image
        if not args.no_frangi:
            t0 = time.perf_counter()
            maps["frangi:mean"] = frangi(image, sigmas=(1, 1.5, 2, 3), black_ridges=False)
            log.info("%s frangi: %.1f s", case, time.perf_counter() - t0)
        res = evaluate_case(label, liver, spacing, maps)
        for key, val in res.items():
            rows.setdefault(key, []).append({"overall": val[0], "thin": val[1]})
            if key.endswith(":mean"):
                log.info("%s %s: AUC %.3f, thin %.3f", case, key, val[0], val[1])
    n = len(next(iter(rows.values()))) if rows else 0
    print(f"\nROC-AUC inside the liver, vessel vs other liver voxels; {where}, "
          f"mean over {n} case(s); thin = local radius < {THIN_MM} mm; head {args.head}, normalisation "
          f"{args.normalisation}\n")
    print("| map | S_t | S_c | S_s | mean | thin S_t | thin S_c | thin S_s | thin mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = [g for g in ("bank", "fpn", "analytic") if g in generators] + ["intensity"] + ([] if args.no_frangi else ["frangi"])
    for g in names:
        cells_o, cells_t = [], []
        for plane in ("S_t", "S_c", "S_s", "mean"):
            vals = rows.get(f"{g}:{plane}")
            cells_o.append("-" if vals is None else f"{np.nanmean([v['overall'] for v in vals]):.3f}")
            cells_t.append("-" if vals is None else f"{np.nanmean([v['thin'] for v in vals]):.3f}")
        print(f"| {g} | " + " | ".join(cells_o + cells_t) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(run_recorded(main, "ROC-AUC of the salience maps inside the liver, vessel against other liver voxels"))
