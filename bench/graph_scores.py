"""Connectivity as a surgeon reads it: graph scores of models on the real patients (issue 28).

    python bench/graph_scores.py --models none=RUN_NONE/best_model.pth offline=RUN_OFFLINE/best_model.pth \
        --record graph_scores_salience

For every real 3D-IRCADb patient under ``--real`` (default ``../shared/real``) each model
segments the scan with its true liver mask, as ``predict.py --liver_mask`` does
(``inference.predictor.Predictor.predict_scan``), and the mask is scored inside the liver
against the true vessels (portal vein + venous system): Dice, clDice, and the graph scores of
``evaluation.graph.graph_scores`` (branch points found within 3 mm, branches found by radius,
pieces of the largest true tree). Prints a table; ``--record NAME`` writes results/NAME.json
(scores only, nothing of the scans). Real data is read in place and never written.
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

from evaluation.graph import graph_scores  # noqa: E402
from evaluation.metrics import cldice, dice  # noqa: E402
from inference.predictor import Predictor  # noqa: E402
from preprocessing.dicom_reader import read_dicom_patient  # noqa: E402
from utils.provenance import file_sha256  # noqa: E402
from utils.records import new_record_arg, write_record  # noqa: E402

SHOWN = ("dice", "cldice", "bp_true", "bp_pred", "bp_recall_3mm", "bp_precision_3mm", "branch_found_lt1",
         "branch_found_1to2", "branch_found_2to3", "branch_found_ge3", "largest_tree_pieces")


def score_patient(pred: Predictor, patient: Path) -> dict[str, float]:
    data = read_dicom_patient(patient, ["portalvein", "venoussystem"])
    liver = data.liver.astype(bool)
    truth = data.label.astype(bool) & liver
    mask = pred.predict_scan(data.hu, data.spacing, liver, name=patient.name).mask & liver
    t0 = time.perf_counter()
    out = {"dice": float(dice(mask, truth)), "cldice": float(cldice(mask, truth)),
           **graph_scores(mask, truth, data.spacing)}
    out["seconds_graph"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="label=model file, e.g. none=.../best_model.pth")
    p.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared" / "real"))
    p.add_argument("--record", type=new_record_arg, default=None, metavar="NAME", help="also write results/NAME.json")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    models = dict(item.split("=", 1) for item in args.models)
    patients = sorted(q for q in Path(args.real).glob("3Dircadb1.*") if q.is_dir())
    if not patients:
        print(f"{args.real}: no real 3D-IRCADb patient; nothing measured")
        return 0
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for label, path in models.items():
        pred = Predictor.from_checkpoint(path, "cpu")
        rows[label] = {q.name: score_patient(pred, q) for q in patients}
    table = _table(rows)
    print("\n".join(table))
    if args.record:
        path = write_record(args.record, {"scores": rows, "table_markdown": table},
                            description="graph scores inside the liver on the real patients (predict.py with the "
                                        "true liver mask), per model: Dice, clDice, branch points found within 3 mm, "
                                        "branches found by mean radius, pieces of the largest true tree",
                            inputs={lab: {"model": m, "sha256": file_sha256(m)} for lab, m in models.items()})
        print(f"record: {path}")
    return 0


def _cell(v: float) -> str:
    return "n/a" if np.isnan(v) else f"{v:.3g}"


def _table(rows: dict) -> list[str]:
    """Markdown lines: a row per model and patient, then the model's mean over patients."""
    out = ["| model | patient | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 2) + "|"]
    for label, per in rows.items():
        for patient, r in per.items():
            out.append(f"| {label} | {patient} | " + " | ".join(_cell(r[k]) for k in SHOWN) + " |")
        mean = {k: float(np.nanmean([r[k] for r in per.values()])) for k in SHOWN}
        out.append(f"| {label} | mean | " + " | ".join(_cell(mean[k]) for k in SHOWN) + " |")
    return out


if __name__ == "__main__":
    sys.exit(main())
