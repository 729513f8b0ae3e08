"""The automatic liver on real CT (issue 26, point 1): liver Dice, where the vessels land, and time.

    python bench/liver_bench.py --liver_model 1=L1.pth --liver_model 7=L7.pth --model VESSELS.pth --record liver_bench

``--liver_model N=FILE`` names the liver model to use on real patient N: give each patient a model
trained *without* it (``scripts/train_liver.sh`` with ``REAL_SRC`` holding only the other patients),
so the Dice is a held-out one. For every real 3D-IRCADb patient under ``--real`` (default
``../shared/real``) that has one, the script runs what ``predict.py --liver_model`` runs
(:func:`inference.liver.segment_liver`, :func:`inference.liver.near_liver`,
``Predictor.predict_scan``) and reports:

- the liver Dice of the automatic liver against the true one (``--liver_refine``, as predict.py:
  after the intensity refinement; and of the model's own mask before it), and the seconds it took;
- what the refinement costs a perfect mask: its Dice applied to the true liver (probability 1
  inside), which lesions and vessels under the surface lower;
- the vessel model ``--model`` on the whole scan three ways: no liver at all (what a new scan got
  before), the automatic liver with ``--margin`` mm, the true liver mask. For each: the share of
  predicted vessel voxels within 10 mm of the true liver, the vessel Dice inside the true liver
  (truth: portal + hepatic veins), the predicted volume (mL) and its number of pieces.

Writes ``results/<record>.json`` (utils.records: numbers only, nothing of the scans) and prints
a table; ``--figure PNG`` draws, per patient, the slice where the intensity refinement changed the
liver most (the model's mask and the refined one against the truth). Real data is read in place and never written.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.figures import masks_figure  # noqa: E402
from evaluation.metrics import dice, n_components  # noqa: E402
from inference.liver import (DEFAULT_MARGIN_MM, check_target, near_liver, refine_by_intensity,  # noqa: E402
                             segment_liver, volume_ml)
from inference.predictor import Predictor  # noqa: E402
from preprocessing.dicom_reader import read_dicom_patient  # noqa: E402
from utils.h5io import apply_hu_window  # noqa: E402
from utils.provenance import file_sha256  # noqa: E402
from utils.records import new_record_arg, write_record  # noqa: E402

NEAR_MM = 10.0  # the "within 10 mm of the true liver"


def parse_models(items: list[str]) -> dict[str, str]:
    """``["1=a.pth", "7=b.pth"]`` -> {"3Dircadb1.1": "a.pth", "3Dircadb1.7": "b.pth"}."""
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--liver_model must look like N=FILE, got {it!r}")
        n, f = it.split("=", 1)
        out[f"3Dircadb1.{int(n)}"] = f
    return out


def add_real_patient_args(p: argparse.ArgumentParser) -> None:
    """The options every real-patient liver bench takes: --liver_model N=FILE (repeated), --real,
    --record and --threads."""
    p.add_argument("--liver_model", action="append", required=True, metavar="N=FILE",
                   help="liver model for real patient N (trained without it); repeat per patient")
    p.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared" / "real"))
    p.add_argument("--record", type=new_record_arg, default=None, help="record name: results/<name>.json")
    p.add_argument("--threads", type=int, default=2)


def start_real_patients(args: argparse.Namespace) -> dict[Path, str]:
    """A real-patient liver bench's start, once its options (:func:`add_real_patient_args`) are
    parsed: warnings-only logging, ``args.threads`` torch threads, and :func:`patients_with_models`;
    when no patient has a model, says so (the bench then measures nothing)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    models = patients_with_models(args.real, args.liver_model)
    if not models:
        print(f"{args.real}: no real 3D-IRCADb patient with a liver model; nothing measured")
    return models


def patients_with_models(real: str, items: list[str]) -> dict[Path, str]:
    """{patient folder: liver model file} for the 3D-IRCADb patients under ``real`` that ``items``
    (``--liver_model N=FILE``) give a model, in name order."""
    models = parse_models(items)
    return {q: models[q.name] for q in sorted(Path(real).glob("3Dircadb1.*")) if q.is_dir() and q.name in models}


def load_liver_model(path: str) -> tuple[Predictor, dict]:
    """The liver model file ``path`` on the CPU (refused if it is a vessel model) and what a
    record keeps of it (:func:`liver_model_inputs`)."""
    liver_seg = Predictor.from_checkpoint(path, "cpu")
    check_target(liver_seg.ckpt, path, "liver")
    return liver_seg, liver_model_inputs(liver_seg, path)


def liver_model_inputs(liver_seg: Predictor, path: str) -> dict:
    """What a record keeps of a liver model: its path, sha256, the commit it was trained at, its
    training cases and settings."""
    cfg = liver_seg.ckpt.get("config") or {}
    return {"path": path, "sha256": liver_seg.sha256, "code_version": liver_seg.ckpt.get("code_version"),
            "trained_on": sorted(((liver_seg.ckpt.get("manifests") or {}).get("dataset") or {}).get("cases", {})),
            **{k: cfg.get(k) for k in ("backbone", "model_kwargs", "target_spacing", "img_size", "max_iterations",
                                       "augment", "scale_aug", "rotate_aug", "elastic_aug", "bias_aug", "blur_aug",
                                       "domain_aug", "intensity_jitter", "loss", "base_lr", "seed", "context_slices")}}


def vessel_row(mask: np.ndarray, truth_vessels: np.ndarray, liver: np.ndarray, near_true: np.ndarray,
               spacing) -> dict:
    n = int(mask.sum())
    return {"share_within_10mm": float((mask & near_true).sum() / n) if n else None,
            "dice_in_liver": float(dice(mask & liver, truth_vessels & liver)),
            "volume_ml": n * float(np.prod(spacing)) / 1000.0, "pieces": int(n_components(mask))}


def changed_slice(a: np.ndarray, b: np.ndarray) -> int:
    """The slice (last axis) where masks ``a`` and ``b`` (H, W, D) differ in the most voxels."""
    return int(np.argmax((a != b).sum(axis=(0, 1))))


def measure_patient(liver_seg: Predictor, seg: Predictor, patient: Path, margin_mm: float, refine: bool,
                    figure_rows: Optional[list] = None) -> dict:
    """One patient's row; with ``figure_rows``, appends its figure row (:func:`evaluation.figures.masks_figure`):
    the slice where the refinement changed the liver most."""
    truth = read_dicom_patient(patient, ["portalvein", "venoussystem"])
    hu, spacing = truth.hu, truth.spacing
    liver_true = truth.liver.astype(bool)
    vessels_true = truth.label.astype(bool)
    found = segment_liver(liver_seg, hu, spacing, name=patient.name, refine=refine)
    liver = found.mask
    if figure_rows is not None:
        z = changed_slice(found.model_mask, liver)
        figure_rows.append((f"{patient.name}, slice {z}", apply_hu_window(hu[:, :, z]),
                            {"the model's mask": found.model_mask[:, :, z], "refined by intensity": liver[:, :, z]},
                            liver_true[:, :, z]))
    t0 = time.perf_counter()
    region = near_liver(liver, spacing, margin_mm)
    t_region = time.perf_counter() - t0
    near_true = near_liver(liver_true, spacing, NEAR_MM)
    rows, secs = {}, {}
    for name, roi in (("no_liver", None), ("auto_liver", region), ("true_liver", liver_true)):
        t = time.perf_counter()
        mask = seg.predict_scan(hu, spacing, roi, name=patient.name).mask
        secs[name] = round(time.perf_counter() - t, 1)
        rows[name] = vessel_row(mask, vessels_true, liver_true, near_true, spacing)
    return {"liver_dice": float(dice(liver, liver_true)),
            "liver_dice_model_mask": float(dice(found.model_mask, liver_true)),
            # the refinement's own cost: applied to a perfect mask (the truth, probability 1 inside)
            "liver_dice_true_mask_refined": float(dice(refine_by_intensity(
                liver_true, liver_true.astype(np.float32), hu, spacing), liver_true)),
            "liver_ml": {"auto": volume_ml(liver, spacing), "true": volume_ml(liver_true, spacing)},
            "liver_seconds": round(found.model_seconds + found.refine_seconds, 2),
            "refine_seconds": round(found.refine_seconds, 2), "margin_seconds": round(t_region, 2), "vessels": rows,
            "vessel_seconds": secs, "shape": list(hu.shape), "spacing": [float(s) for s in spacing]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_real_patient_args(p)
    p.add_argument("--model", required=True, help="vessel model file")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN_MM, help="predict.py --liver_margin (mm)")
    p.add_argument("--liver_refine", type=int, choices=(0, 1), default=1,
                   help="predict.py --liver_refine: the intensity refinement of the liver (the model's own mask's "
                        "Dice is reported either way)")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="also draw, per patient, the slice where the refinement changed the liver most: the "
                        "model's mask and the refined one against the truth (TP green, FP red, FN blue)")
    args = p.parse_args()
    if args.figure and not args.liver_refine:
        p.error("--figure shows what the refinement changed; it needs --liver_refine 1")
    models = start_real_patients(args)
    if not models:
        return 0
    patients = list(models)
    seg = Predictor.from_checkpoint(args.model, "cpu")
    rows, trained, figure_rows = {}, {}, ([] if args.figure else None)
    for q in patients:
        liver_seg, trained[q.name] = load_liver_model(models[q])
        rows[q.name] = measure_patient(liver_seg, seg, q, args.margin, bool(args.liver_refine), figure_rows)
    table = ["| patient | liver Dice | liver Dice, model's mask | true mask refined | liver model s | vessel mask | voxels within 10 mm of the true liver | "
             "vessel Dice in the liver | mL | pieces |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        for k, v in r["vessels"].items():
            share = "-" if v["share_within_10mm"] is None else f"{v['share_within_10mm']:.1%}"
            table.append(f"| {name} | {r['liver_dice']:.3f} | {r['liver_dice_model_mask']:.3f} | "
                         f"{r['liver_dice_true_mask_refined']:.3f} | "
                         f"{r['liver_seconds']:.1f} | {k.replace('_', ' ')} | "
                         f"{share} | {v['dice_in_liver']:.3f} | {v['volume_ml']:.1f} | {v['pieces']} |")
    print(f"vessel model {args.model}; liver margin {args.margin:g} mm; intensity refinement "
          f"{'on' if args.liver_refine else 'off'}; {args.threads} CPU threads")
    print("\n".join(table))
    if args.figure:
        masks_figure(Path(args.figure), figure_rows,
                     [rows[q.name]["spacing"][0] / rows[q.name]["spacing"][1] for q in patients],
                     title="liver: the model's mask and the intensity-refined one against the truth")
        print(f"figure: {args.figure}")
    if args.record:
        path = write_record(args.record, {"patients": rows, "margin_mm": args.margin,
                                          "liver_refine": bool(args.liver_refine), "table_markdown": table},
                            description=(
            "predict.py's automatic liver on real 3D-IRCADb patients, each with a liver model trained without "
            "it: liver Dice (as predict.py gives it, after the intensity refinement unless --liver_refine 0; "
            "of the model's own mask; and of the refinement applied to the true liver mask, its own cost) and "
            "seconds; the vessel model's mask on the whole scan with no liver, the automatic "
            "liver (+ margin) and the true liver: share of vessel voxels within 10 mm of the true liver, vessel "
            "Dice inside the true liver, volume and pieces"),
            inputs={"model": str(args.model), "model_sha256": file_sha256(args.model),
                    "liver_models": trained,
                    "real": [q.name for q in patients]})
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
