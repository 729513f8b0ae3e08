"""Where the automatic liver errs on real CT, and how far each kind of correction could at most take it.

    python bench/liver_errors.py --liver_model 1=L1.pth --liver_model 7=L7.pth --record liver_errors

``--liver_model N=FILE`` as in ``bench/liver_bench.py``: give each real patient a liver model
trained without it. For every real 3D-IRCADb patient under ``--real`` (default ``../shared/real``)
that has one, runs what ``predict.py --liver_model`` runs for the liver
(:func:`inference.liver.segment_liver`: the model on the whole scan, the opening, then the intensity
refinement unless ``--liver_refine 0``) and reports
:func:`evaluation.liver_errors.liver_errors` of that mask against the true one:

- the missed and the extra liver (mL); the share of the extra within 2 mm of the true liver;
- the share of the missed liver that the model gave a probability under 0.05 (missed with
  confidence) and the share whose HU lie more than 2 robust deviations from the scan's
  parenchyma (:func:`inference.liver.parenchyma_hu` of the model's mask, as the refinement
  measures it); the largest missed piece (mL, slices);
- the Dice an oracle correction of each family would reach (a threshold lowered to 0.05, a surface
  moved by up to 2 mm, growth within 2 deviations of the parenchyma's HU, the largest miss added):
  the ceiling of any post-processing of that kind, measured before one is built.

Writes ``results/<record>.json`` (utils.records: numbers only, nothing of the scans) and prints a
table. Real data is read in place and never written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.liver_bench import add_real_patient_args, load_liver_model, start_real_patients  # noqa: E402
from evaluation.liver_errors import liver_errors  # noqa: E402
from inference.liver import parenchyma_hu, segment_liver  # noqa: E402
from inference.predictor import Predictor  # noqa: E402
from preprocessing.dicom_reader import read_dicom_patient  # noqa: E402
from utils.boxes import bounding_box  # noqa: E402
from utils.records import write_record  # noqa: E402

CEILINGS = ("threshold", "surface", "intensity", "largest_miss")


def measure_patient(liver_seg: Predictor, patient: Path, refine: bool) -> dict:
    """One patient's :func:`evaluation.liver_errors.liver_errors` of predict.py's automatic liver."""
    truth = read_dicom_patient(patient, ["portalvein", "venoussystem"])
    hu, spacing = truth.hu, truth.spacing
    found = segment_liver(liver_seg, hu, spacing, name=patient.name, refine=refine)
    # the parenchyma as the refinement measures it, on the model mask's box (the depth pads with background)
    box = bounding_box(found.model_mask, margin=1)
    parenchyma = None if box is None else parenchyma_hu(found.model_mask[box], found.prob[box], hu[box], spacing)
    out = liver_errors(found.mask, truth.liver.astype(bool), found.prob, hu, spacing, parenchyma)
    out["parenchyma_hu"] = None if parenchyma is None else [round(v, 1) for v in parenchyma]
    return out


def table_row(name: str, r: dict) -> str:
    """One patient's Markdown table row of :func:`measure_patient`'s numbers."""
    def pct(v):
        return "-" if v is None else f"{v:.0%}"

    def d3(v):
        return "-" if v is None else f"{v:.3f}"
    z = r["largest_miss_slices"]
    where = "" if z is None else f" (slices {z[0]}-{z[1]})"
    return (f"| {name} | {r['dice']:.3f} | {r['fn_ml']:.0f} | {r['fp_ml']:.0f} | {pct(r['fp_near_share'])} | "
            f"{pct(r['fn_confident_share'])} | {pct(r['fn_atypical_share'])} | {r['largest_miss_ml']:.0f}{where} | "
            + " | ".join(d3(r["ceilings"].get(k)) for k in CEILINGS) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_real_patient_args(p)
    p.add_argument("--liver_refine", type=int, choices=(0, 1), default=1,
                   help="predict.py --liver_refine: describe the mask after the intensity refinement (1) or the "
                        "model's own (0)")
    args = p.parse_args()
    models = start_real_patients(args)
    if not models:
        return 0
    rows, trained = {}, {}
    for q, path in models.items():
        liver_seg, trained[q.name] = load_liver_model(path)
        rows[q.name] = measure_patient(liver_seg, q, bool(args.liver_refine))
    table = ["| patient | liver Dice | missed mL | extra mL | extra within 2 mm | missed at p < 0.05 | "
             "missed beyond 2 SD of the HU | largest miss mL | ceiling: threshold | surface | intensity | "
             "largest miss |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table += [table_row(name, r) for name, r in rows.items()]
    print(f"liver mask {'after' if args.liver_refine else 'before'} the intensity refinement; "
          f"{args.threads} CPU threads")
    print("\n".join(table))
    if args.record:
        path = write_record(args.record, {"patients": rows, "liver_refine": bool(args.liver_refine),
                                          "table_markdown": table},
                            description=(
            "where predict.py's automatic liver errs on real 3D-IRCADb patients, each with a liver model trained "
            "without it (evaluation.liver_errors): missed and extra liver, how confidently and how atypically "
            "(HU) the missed liver was missed, the largest miss, and the Dice an oracle correction of each "
            "family reaches (missed voxels at p >= 0.05 added; every error within 2 mm of the predicted surface "
            "put right; missed voxels within 2 SD of the parenchyma's HU added; the largest miss added)"),
            inputs={"liver_models": trained, "real": [q.name for q in models]})
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
