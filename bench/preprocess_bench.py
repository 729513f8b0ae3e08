"""Benchmark preprocess.py: seconds per full-size patient, single worker, and the size on disk.

One patient of the phantom's ``full`` preset (512 x 512 x 100-160; synthetic arrays of the same
size if phantom.generator is not importable) is written as 3D-IRCADb DICOM, then converted
``--runs`` times from scratch, once as a test case (volume only) and once as a training case
(volume + one slice file per stored slice). Prints a table: median / min / max wall seconds,
median CPU seconds of this process (robust to a shared machine), stored shape, MB on disk, and
the machine (CPU count, load average).

    .venv/bin/python bench/preprocess_bench.py [--runs 3] [--index 1] [--seed 0] [--crop liver_z]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.records import run_recorded  # noqa: E402

from phantom.dicom_io import write_patient  # noqa: E402
from preprocessing.pipeline import CROP_MODES, preprocess  # noqa: E402
from utils.h5io import DatasetPaths, read_volume, write_list  # noqa: E402

log = logging.getLogger("preprocess_bench")


def make_source(src: Path, index: int, seed: int) -> str:
    """Write patient ``3Dircadb1.<index>`` under ``src``; returns a description of what was written."""
    try:
        from phantom.generator import generate_patient
    except ImportError:
        generate_patient = None
    if generate_patient is not None:
        p = generate_patient(index, seed=seed, preset="full")
        hu, masks, spacing, unsigned = p.hu, p.masks, p.spacing, p.unsigned_intercept
        what = "phantom.generator full"
    else:
        rng = np.random.default_rng(seed)
        shape = (512, 512, 130)
        hu = (rng.normal(100, 18, shape) - 1000 * (rng.random(shape) < 0.3)).astype(np.int16)
        liver = np.zeros(shape, np.uint8)
        liver[120:400, 100:380, 20:110] = 1
        masks = {"liver": liver, "portalvein": (rng.random(shape) > 0.99).astype(np.uint8) * liver,
                 "venoussystem": (rng.random(shape) > 0.99).astype(np.uint8) * liver}
        spacing, unsigned = (0.7, 0.7, 1.6), False
        what = "synthetic arrays"
    write_patient(src / f"3Dircadb1.{index}", hu, masks, spacing, unsigned_intercept=unsigned)
    return f"{what}: {hu.shape[0]}x{hu.shape[1]}x{hu.shape[2]}, spacing {tuple(round(s, 3) for s in spacing)}"


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6 if path.exists() else 0.0


def bench(runs: int, index: int, seed: int, crop: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="preprocess_bench_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        desc = make_source(tmp / "src", index, seed)
        log.info("source written in %.1f s (%s)", time.perf_counter() - t0, desc)
        case = f"case{index:04d}"
        for role in ("test", "train"):
            times, cpu = [], []
            for r in range(runs):
                root, lists = tmp / f"out_{role}_{r}", tmp / f"list_{role}_{r}"
                for split in ("train", "val", "test"):
                    write_list(lists / "bench" / f"vol_{split}.txt", [case] if split == role else [])
                t, c = time.perf_counter(), time.process_time()
                summary = preprocess("bench", tmp / "src", root, lists, crop=crop, workers=1)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
                if not summary.ok:
                    raise RuntimeError(f"conversion failed: {summary.failed}")
            paths = DatasetPaths.of(root, "bench", lists)
            vol = read_volume(paths.volume(case))
            rows.append(dict(
                role=role, source=desc, stored=vol.image.shape, median=statistics.median(times),
                min=min(times), max=max(times), cpu=statistics.median(cpu), vol_mb=du_mb(paths.vol_data), slice_mb=du_mb(paths.slice_data),
            ))
            for r in range(runs):
                shutil.rmtree(tmp / f"out_{role}_{r}", ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--index", type=int, default=1, help="phantom patient index")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", choices=CROP_MODES, default="liver_z")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    rows = bench(args.runs, args.index, args.seed, args.crop)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load avg "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; python {platform.python_version()}; single worker")
    print(f"source: {rows[0]['source']}; crop {args.crop}; {args.runs} runs each")
    print("\n| case role | stored (H, W, D) | median s | min s | max s | CPU s | volume MB | slices MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        shape = " x ".join(str(s) for s in r["stored"])
        print(f"| {r['role']} | {shape} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | {r['cpu']:.2f} | "
              f"{r['vol_mb']:.1f} | {r['slice_mb']:.1f} |")


if __name__ == "__main__":
    sys.exit(run_recorded(main, "preprocess.py time per patient, seconds"))
