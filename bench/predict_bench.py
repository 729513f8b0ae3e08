"""End-to-end speed of predict.py on a 512 x 512 x 120 CT with the demo model.

    python bench/predict_bench.py                     # phantom scan (+ real 3Dircadb1.1 when present), 2 threads
    python bench/predict_bench.py --repeats 3 --threads 2 --device cpu
    python bench/predict_bench.py --device cuda       # the GPU figure
    python bench/predict_bench.py --tree_model TREE.pth  # also label the trees (a "trees" stage)
    python bench/predict_bench.py --liver_model LIVER.pth  # find the liver first (a "liver" stage)

The scan: a ``full``-preset phantom patient (whole-abdomen field of view, 512 x 512) cut to
120 slices and written as a DICOM series; and, when ``../shared/real/3Dircadb1.1`` exists,
the first 120 slices of that real patient (read in place through links, nothing copied).
The model: the newest ``checkpoint/phantom/unet/**/demo/best_model.pth`` if ``make demo``
made one, else a model file with the demo settings (U-Net, 16 base channels, offline bank
salience with the shipped head embedded, img_size 192) and random weights whose last
bias is set so that about 0.5% of its central slices is vessel (speed does not depend on the weights;
the statistics do depend on the mask's size, so it is kept realistic).

Each run is ``prediction.segment.run_predict`` (what predict.py calls) with model loading,
reading, HU window, salience, inference, statistics and the NIfTI write, in this process
with ``--threads`` torch threads. Wall time per stage and in total, and the process CPU
time, medians of ``--repeats`` runs; the machine and its load average are printed: on a
shared machine the wall time grows with the load, the CPU time much less.
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
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prediction.segment import run_predict  # noqa: E402
from inference import predict_volume  # noqa: E402
from networks.checkpoint import generator_from_checkpoint, generator_record, save_checkpoint  # noqa: E402
from networks.e2e import build_segmenter  # noqa: E402
from networks.salience import default_head_path, salience_3d  # noqa: E402
from phantom.dicom_io import write_patient  # noqa: E402
from phantom.generator import generate_patient  # noqa: E402
from utils.logging_setup import setup_logging  # noqa: E402
from utils.records import new_record_arg  # noqa: E402

log = logging.getLogger("predict_bench")
ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real" / "3Dircadb1.1" / "PATIENT_DICOM"
DEMO_KW = {"base_channels": 16}
DEMO_IMG = [192, 192]
STAGES = ("read", "window", "salience", "inference", "stats", "write_nifti")
#: with --extras: the branch graph (GraphML + VTK) and the DICOM-SEG
EXTRA_STAGES = ("dicom_seg", "graph")


def phantom_scan(folder: Path, depth: int) -> Path:
    """A full-preset phantom (512 x 512) with ``depth`` slices as a DICOM series; returns the series folder."""
    p = generate_patient(1, 0, "full")
    hu = p.hu
    if hu.shape[2] < depth:
        hu = np.concatenate([hu] * (depth // hu.shape[2] + 1), axis=2)
    write_patient(folder, hu[:, :, :depth].astype(np.float32), {}, p.spacing)
    return folder / "PATIENT_DICOM"


def real_scan(folder: Path, depth: int) -> Optional[Path]:
    """Links to the first ``depth`` slices of the real patient (None when it is absent)."""
    if not REAL.is_dir():
        return None
    files = sorted(REAL.iterdir(), key=lambda p: int(p.name.split("_")[-1]))[:depth]
    folder.mkdir(parents=True)
    for f in files:
        (folder / f.name).symlink_to(f)
    return folder


def demo_model(out: Path, scan_hu_image: np.ndarray) -> tuple[Path, str]:
    """(model file, what it is): the demo run's model, or a demo-settings model with random weights."""
    found = sorted((ROOT / "checkpoint" / "phantom" / "unet").glob("**/demo/best_model.pth"),
                   key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1], f"trained demo model {found[-1].relative_to(ROOT)}"
    torch.manual_seed(0)
    model = build_segmenter("unet", "offline", 1, DEMO_KW).eval()
    rec = generator_record("bank", default_head_path())
    # set the last bias so that ~0.5% of the central slices are vessel (a realistic mask size for the statistics)
    sub = scan_hu_image[:, :, scan_hu_image.shape[2] // 2 - 2: scan_hu_image.shape[2] // 2 + 2]
    gen = generator_from_checkpoint({"salience": "offline", "generator": rec})
    prob = predict_volume(model, sub, salience_3d(sub, gen), salience_mode="offline", spatial_dims=2,
                          img_size=DEMO_IMG)
    logit = np.log(np.clip(prob, 1e-7, 1 - 1e-7) / np.clip(1 - prob, 1e-7, 1))
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias.sub_(float(np.quantile(logit, 0.995)))
    path = out / "demo_settings_random.pth"
    save_checkpoint(path, model, model_name="unet", model_kwargs=DEMO_KW, salience="offline", config={}, epoch=0,
                    iteration=0, best_metric=0.0, img_size=DEMO_IMG, generator=rec)
    return path, "demo settings (unet base 16, offline bank, img 192), random weights"


def bench_stages(extras: bool, tree_model: Optional[Path], liver_model: Optional[Path] = None) -> tuple[str, ...]:
    """The timed stages: predict.py's, then the optional ones (the liver model runs before the
    salience, the tree model before the statistics, the extras after the NIfTI write)."""
    return (("liver",) if liver_model is not None else ()) + STAGES + (("trees",) if tree_model is not None else ()) \
        + (EXTRA_STAGES if extras else ())


def time_runs(model: Path, scan: Path, out: Path, repeats: int, device: str, extras: bool = False,
              tree_model: Optional[Path] = None, liver_model: Optional[Path] = None) -> dict[str, float]:
    rows = []
    stages = bench_stages(extras, tree_model, liver_model)
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        (res,) = run_predict(model, scan, out, device=device, overwrite=True, graph=extras, dicom_seg=extras,
                             tree_model=tree_model, liver_model=liver_model)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {**{k: res.seconds.get(k, 0.0) for k in stages}, **{f"cpu_{k}": res.cpu_seconds.get(k, 0.0)
                                                                   for k in stages},
               "total": total, "cpu": cpu, "vessel_ml": res.stats["vessel_volume_ml"]}
        rows.append(row)
        log.info("run %d/%d: %.1f s wall (%s), %.1f s CPU", i + 1, repeats, total,
                 ", ".join(f"{k} {row[k]:.1f}" for k in stages), cpu)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core target)")
    p.add_argument("--depth", type=int, default=120, help="slices of the 512 x 512 scan")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-real", action="store_true", help="skip the real patient even when present")
    p.add_argument("--record", type=new_record_arg, default=None, metavar="NAME",
                   help="also write results/NAME.json (utils.records)")
    p.add_argument("--extras", action="store_true", help="also write the branch graph and the DICOM-SEG (--graph "
                                                          "--dicom_seg) and time them")
    p.add_argument("--tree_model", type=Path, default=None, metavar="FILE",
                   help="also label the vessels' trees with this tree model (train_tree_model.py) and time it")
    p.add_argument("--liver_model", type=Path, default=None, metavar="FILE",
                   help="find the liver first with this liver model (scripts/train_liver.sh; predict.py "
                        "--liver_model, intensity refinement on) and time it")
    args = p.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="predict_bench_") as tmp_s:
        tmp = Path(tmp_s)
        log.info("writing a 512 x 512 x %d phantom scan as DICOM ...", args.depth)
        scans = {"phantom (full preset)": phantom_scan(tmp / "phantom", args.depth)}
        real = None if args.no_real else real_scan(tmp / "real", args.depth)
        if real is not None:
            scans["real 3Dircadb1.1"] = real
        from inference.scans import find_cases, read_scan

        first = read_scan(find_cases(scans["phantom (full preset)"])[0])
        model, what = demo_model(tmp, np.clip(first.hu, 0, 400) / np.float32(400))
        results = {}
        for name, scan in scans.items():
            log.info("%s: %d runs ...", name, args.repeats)
            results[name] = time_runs(model, scan, tmp / "out", args.repeats, args.device, args.extras,
                                      args.tree_model, args.liver_model)
    load = os.getloadavg()
    print(f"\n# predict.py end to end, 512 x 512 x {args.depth} DICOM series, model: {what}")
    print(f"# machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
          + f"; load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end (shared machine when > threads)")
    print(f"# medians of {args.repeats} runs, seconds; total includes loading the model file\n")
    stages = bench_stages(args.extras, args.tree_model, args.liver_model)
    head = "| scan | clock | " + " | ".join(stages) + " | total | vessel mL |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, r in results.items():
        print(f"| {name} | wall | " + " | ".join(f"{r[k]:.1f}" for k in stages)
              + f" | {r['total']:.1f} | {r['vessel_ml']:.1f} |")
        print(f"| {name} | process CPU | " + " | ".join(f"{r['cpu_' + k]:.1f}" for k in stages)
              + f" | {r['cpu']:.1f} | |")
    print("\n# process CPU = CPU seconds of all threads; on an idle machine the wall time of a stage lies between "
          "CPU / threads (perfectly parallel) and CPU (serial)")
    if args.record:
        from utils.provenance import file_sha256
        from utils.records import write_record

        path = write_record(args.record, {"stages": list(stages), "scans": results, "load_average": list(load)},
                            description="predict.py end to end: wall and process CPU seconds per stage",
                            inputs={"depth": args.depth, "repeats": args.repeats, "threads": args.threads,
                                    "device": args.device, "model": what,
                                    "tree_model": None if args.tree_model is None else str(args.tree_model),
                                    "liver_model": None if args.liver_model is None else str(args.liver_model),
                                    "liver_model_sha256": None if args.liver_model is None
                                    else file_sha256(args.liver_model)})
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
