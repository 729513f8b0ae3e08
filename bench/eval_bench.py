"""Benchmark: all metrics of one case, medpy's hd95 + assd beside them, and 2-D U-Net inference.

    .venv/bin/python bench/eval_bench.py [--repeats 3] [--medpy_repeats 3] [--unet_repeats 1]
                                         [--threads 2] [--img_size 256] [--slices 120]

Volume: 512 x 512 x ``--slices`` at the phantom's 'full' spacing, truth = the vessel label
(portal + hepatic trees) of ``phantom.generator.generate_patient(1, 0, "full")``, slices
taken around the liver; prediction = truth perturbed (gaps cut into the tree, one half
dilated by a voxel, false-positive blobs). Prints a table of medians (and min / max) with
the machine, the sizes and the thread count. Targets (issue 6): all metrics <= 15 s on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.records import run_recorded  # noqa: E402


def _timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def make_case(slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], np.ndarray]:
    """(pred, truth, spacing, image) for the benchmark; image in [0, 1] (H, W, D)."""
    from phantom.generator import generate_patient

    p = generate_patient(1, seed, "full")
    truth = (p.masks["portalvein"] > 0) | (p.masks["venoussystem"] > 0)
    d = truth.shape[2]
    zs = np.flatnonzero(p.masks["liver"].any(axis=(0, 1)))
    mid = int(zs.mean())
    z0 = int(np.clip(mid - slices // 2, 0, max(d - slices, 0)))
    sl = slice(z0, z0 + slices)
    truth = truth[:, :, sl]
    image = (np.clip(p.hu[:, :, sl].astype(np.float32), 0, 400) / 400).astype(np.float32)
    if truth.shape[2] < slices:  # the phantom volume is shorter than asked: pad with empty slices
        pad = ((0, 0), (0, 0), (0, slices - truth.shape[2]))
        truth, image = np.pad(truth, pad), np.pad(image, pad)
    rng = np.random.default_rng(seed)
    pred = truth.copy()
    # gaps: clear 4 mm cubes around 15 random centreline-ish points
    pts = np.argwhere(truth)
    for i, j, k in pts[rng.choice(len(pts), 15, replace=False)]:
        pred[max(i - 3, 0):i + 3, max(j - 3, 0):j + 3, max(k - 1, 0):k + 2] = False
    # over-segmentation on one half
    half = truth.shape[1] // 2
    pred[:, :half] = ndimage.binary_dilation(pred[:, :half])
    # false-positive blobs
    liver = p.masks["liver"][:, :, sl] > 0
    cand = np.argwhere(liver[:, :, : truth.shape[2]]) if liver.any() else np.argwhere(np.ones_like(truth))
    for i, j, k in cand[rng.choice(len(cand), 30, replace=False)]:
        pred[max(i - 2, 0):i + 2, max(j - 2, 0):j + 2, max(k - 1, 0):k + 1] = True
    return pred, truth, tuple(float(s) for s in p.spacing), image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of all our metrics")
    ap.add_argument("--medpy_repeats", type=int, default=3)
    ap.add_argument("--unet_repeats", type=int, default=1, help="0 skips the U-Net inference timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--img_size", type=int, default=256, help="2-D U-Net input size (the seed's 256)")
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--unet_slices", type=int, default=0,
                    help="time the U-Net on only this many slices and extrapolate to the volume (0: all)")
    args = ap.parse_args()

    import torch
    from medpy.metric import binary as mb

    from evaluation.metrics import assd, evaluate_case, hd95, skeleton

    # the metrics are single-threaded numpy / scipy / skimage; only torch takes threads
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    pred, truth, spacing, image = make_case(args.slices)
    t_make = time.perf_counter() - t0
    rows: list[tuple[str, list[float]]] = []

    t, case = _timed(lambda: evaluate_case(pred, truth, spacing), args.repeats)
    rows.append(("all metrics (evaluate_case)", t))
    t, _ = _timed(lambda: (hd95(pred, truth, spacing), assd(pred, truth, spacing)), args.repeats)
    rows.append(("ours: hd95 + assd", t))
    t, _ = _timed(lambda: (skeleton(pred), skeleton(truth)), args.repeats)
    rows.append(("ours: both skeletons", t))
    ref = None
    if args.medpy_repeats > 0:
        t, ref = _timed(lambda: (mb.hd95(pred, truth, voxelspacing=spacing), mb.assd(pred, truth, voxelspacing=spacing)),
                        args.medpy_repeats)
        rows.append(("medpy: hd95 + assd", t))

    if args.unet_repeats > 0:
        from inference import predict_volume
        from networks.registry import build_model

        torch.manual_seed(0)
        net = build_model("unet", 1, 1).eval()  # the seed's U-Net, base 64
        n = image.shape[2] if args.unet_slices <= 0 else min(args.unet_slices, image.shape[2])
        sub = np.ascontiguousarray(image[:, :, :n])
        t, _ = _timed(lambda: predict_volume(net, sub, None, salience_mode="none", spatial_dims=2,
                                             img_size=(args.img_size, args.img_size), batch_size=8), args.unet_repeats)
        rows.append((f"2-D U-Net (base 64) inference, {n} slices at {args.img_size}^2", t))
        if n < image.shape[2]:
            rows.append((f"  -> extrapolated to {image.shape[2]} slices", [x * image.shape[2] / n for x in t]))

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch threads {torch.get_num_threads()}, python {platform.python_version()}, torch {torch.__version__}")
    print("note: the machine may be shared with other processes; timings are wall-clock")
    print(f"volume {pred.shape} spacing {spacing} mm; truth {int(truth.sum())} voxels, pred {int(pred.sum())} voxels; "
          f"phantom generated in {t_make:.1f} s")
    print(f"dice {case['dice']:.4f} cldice {case['cldice']:.4f} hd95 {case['hd95_mm']:.3f} mm assd {case['assd_mm']:.3f} mm"
          + ("" if ref is None else f" | medpy hd95 {ref[0]:.3f} mm assd {ref[1]:.3f} mm"))
    print("\n| step | runs | median s | min s | max s |\n|---|---:|---:|---:|---:|")
    for name, ts in rows:
        print(f"| {name} | {len(ts)} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} |")


if __name__ == "__main__":
    sys.exit(run_recorded(main, "metrics and U-Net inference time on a 512 x 512 x 120 volume, seconds"))
