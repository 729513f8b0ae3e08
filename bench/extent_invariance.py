"""Does a prediction depend on how far the scan extends? (issue 24, point 3)

    python bench/extent_invariance.py --model checkpoint/phantom/unet/epo100_bs4_lr0.003/demo/best_model.pth
    python bench/extent_invariance.py --model FILE --record extent_invariance_before   # also a record

For every real 3D-IRCADb patient under ``--real`` (default ``../shared/real``) the model file
segments three versions of the scan, as ``predict.py`` does (``inference.predictor.Predictor.predict_scan``):

- ``whole``: the whole DICOM series, no liver mask (what a new user runs);
- ``cropped``: with the true liver mask, i.e. the volume cut to the liver's slices as in training;
- ``padded``: the whole series with 20 extra slices of bone-bright voxels (1000 HU over the body
  outline of the end slice) above and 20 below.

Inside the true liver it reports the Dice of ``whole`` against ``cropped`` and of ``padded``
against ``whole`` (1.0: the prediction does not depend on the scan's extent), and each
version's vessel Dice against the truth. Prints a table; with ``--record NAME`` (``--name``, its
former spelling) also writes ``results/NAME.json`` (utils.records: Dice values and seconds only,
nothing of the scans themselves). Real data is
read in place and never written.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.metrics import dice  # noqa: E402
from inference.scans import Scan, find_cases, read_scan  # noqa: E402
from inference.predictor import Predictor  # noqa: E402
from preprocessing.dicom_reader import read_dicom_patient  # noqa: E402
from utils.orientation import lps_view  # noqa: E402
from utils.provenance import file_sha256  # noqa: E402
from utils.records import new_record_arg, write_record  # noqa: E402

PAD_SLICES = 20  # at each end: 40 in all
BONE_HU = 1000.0
BODY_HU = -300.0  # the body outline of the end slice: voxels above this


def pad_with_bone(scan: Scan, n: int = PAD_SLICES) -> Scan:
    """``scan`` with ``n`` slices of bone-bright body (``BONE_HU``) added at each end of the slice axis."""
    hu = scan.hu
    top = np.where(hu[:, :, :1] > BODY_HU, BONE_HU, -1000.0).astype(np.float32)
    bottom = np.where(hu[:, :, -1:] > BODY_HU, BONE_HU, -1000.0).astype(np.float32)
    padded = np.concatenate([np.repeat(top, n, axis=2), hu, np.repeat(bottom, n, axis=2)], axis=2)
    return Scan(scan.case + "_padded", padded, scan.spacing, scan.geometry, scan.output_geometry,
                description={**scan.description, "padded_slices": 2 * n})


def measure_patient(seg: Predictor, patient: Path) -> dict:
    src = find_cases(patient)[0]
    scan = read_scan(src)
    view = lps_view(scan.geometry.direction)  # as predict.py runs the models (the stored geometry is unused here)
    scan = replace(scan, hu=view.forward(scan.hu), spacing=view.spacing(scan.spacing))
    truth = read_dicom_patient(patient, ["portalvein", "venoussystem"])
    if truth.hu.shape != scan.hu.shape or not np.array_equal(truth.hu, scan.hu):
        raise ValueError(f"{patient}: the preprocessing reader and predict.py's reader disagree on the image")
    liver = truth.liver.astype(bool)
    label = truth.label.astype(bool) & liver
    t0 = time.perf_counter()
    whole = seg.predict_scan(scan.hu, scan.spacing, name=scan.case).mask
    t1 = time.perf_counter()
    cropped = seg.predict_scan(scan.hu, scan.spacing, liver, name=scan.case).mask
    t2 = time.perf_counter()
    longer = pad_with_bone(scan)
    padded = seg.predict_scan(longer.hu, longer.spacing, name=longer.case).mask[:, :, PAD_SLICES:-PAD_SLICES]
    t3 = time.perf_counter()
    w, c, p = whole & liver, cropped & liver, padded & liver
    return {
        "dice_whole_vs_cropped": float(dice(w, c)),
        "dice_padded_vs_whole": float(dice(p, w)),
        "dice_truth": {"whole": float(dice(w, label)), "cropped": float(dice(c, label)),
                       "padded": float(dice(p, label))},
        "seconds": {"whole": round(t1 - t0, 1), "cropped": round(t2 - t1, 1), "padded": round(t3 - t2, 1)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared" / "real"))
    p.add_argument("--record", "--name", dest="record", type=new_record_arg, default=None, metavar="NAME",
                   help="also write results/NAME.json (--name: its former spelling)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    patients = sorted(q for q in Path(args.real).glob("3Dircadb1.*") if q.is_dir())
    if not patients:
        print(f"{args.real}: no real 3D-IRCADb patient; nothing measured")
        return 0
    seg = Predictor.from_checkpoint(args.model, "cpu")
    rows = {q.name: measure_patient(seg, q) for q in patients}
    rule = (seg.ckpt.get("generator") or {}).get("normalisation", "volume")
    print(f"model {args.model} (salience {seg.salience_mode}, normalisation {rule})")
    print("| patient | Dice whole vs cropped | Dice padded vs whole | truth: whole | cropped | padded |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        t = r["dice_truth"]
        print(f"| {name} | {r['dice_whole_vs_cropped']:.4f} | {r['dice_padded_vs_whole']:.4f} | {t['whole']:.3f} | "
              f"{t['cropped']:.3f} | {t['padded']:.3f} |")
    if not args.record:
        return 0
    path = write_record(args.record, {"patients": rows, "normalisation": rule}, description=(
        "Inside the true liver: Dice between predict.py's masks of the whole scan and of the scan cropped to "
        "the liver (training's crop), and of the scan padded with 2 x 20 slices of 1000 HU against the whole "
        "scan; and each against the true vessels (portal + hepatic)."),
        inputs={"model": str(args.model), "model_sha256": file_sha256(args.model), "real": [q.name for q in patients]})
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
