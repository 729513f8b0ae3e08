"""Speed and memory of ``salience_3d`` on the CPU, against a straightforward implementation.

    python bench/salience_bench.py                         # 192x192x48 and 512x512x120, bank and fpn
    python bench/salience_bench.py --quick                 # 96x96x24 only
    python bench/salience_bench.py --sizes 192x192x48 --generators bank --repeats 5

Ours: ``networks.salience.salience_3d`` (affine prefix folded into one convolution, planes
batched under ``max_batch_voxels``, valid convolutions on a 7-pixel zero margin).
Straightforward (kept here, the way the authors ran it): one plane at a time, zero-padded
into a 512 x 512 canvas (a plane that does not fit with an 8-pixel margin gets a canvas of
its size + 16), layer by layer: for ``bank`` separate even and odd convolutions per kernel
size (12 + 12 kernels of k x k, summed), then the head; for ``fpn`` the seed's network as
released. With ``--baseline-planes N`` the straightforward one runs N evenly spaced planes
per orientation and its time is extrapolated to all planes (it is the slow side: all
1144 planes of 512x512x120 take tens of minutes on 2 cores); its outputs on those planes
are compared with ours (max abs difference of the raw maps, must be <= 1e-4).

Columns: voxels/s = H*W*D / time (three planes per voxel); GFLOP/s executed = the
multiply-adds our code performs x 2 / time; GFLOP/s layer-equivalent = the FLOPs of the
layer-by-layer network on the plane pixels (what a non-folded implementation must do
without padding waste) / time; matmul = torch's float32 2048^2 matmul in the same run.
Peak memory: maximum resident set of a fresh process that builds the volume and runs the
case (``resource.getrusage``; includes the Python + torch runtime, measured alone).
Times are medians of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.records import run_recorded  # noqa: E402

from networks.salience import (  # noqa: E402
    BANK_ORIENTATIONS,
    BANK_SIZES,
    FPN_BLOCKS,
    PLANES,
    BankGenerator,
    FPNGenerator,
    SalienceHead,
    SeedFPN,
    bank_orientations,
    default_head_path,
    load_fpn,
    load_head,
    oriented_kernel,
    salience_3d,
    standardise_planes,
    volume_planes,
)

log = logging.getLogger("salience_bench")
SEED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / (
    "dice_best_Wavelet_square_net_vessel_data_size512.pth")
HEAD_PATH = default_head_path()
CANVAS = 512


# ----------------------------------------------------------------------------- inputs
def make_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A liver-like test volume in [0, 1]: noisy parenchyma with a few bright tubes."""
    rng = np.random.default_rng(seed)
    h, w, d = shape
    vol = np.full(shape, 0.25, dtype=np.float32)
    vol += rng.normal(0, 0.045, shape).astype(np.float32)
    r = np.arange(h, dtype=np.float32)[:, None]
    c = np.arange(w, dtype=np.float32)[None, :]
    for _ in range(6):
        r0, c0, ang = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, math.pi)
        dist = np.abs((c - c0) * math.sin(ang) - (r - r0) * math.cos(ang))
        vol += (0.15 * (dist < rng.uniform(1, 4))).astype(np.float32)[:, :, None]
    return np.clip(vol, 0, 1)


def make_head(seed: int = 0) -> SalienceHead:
    if HEAD_PATH.is_file():
        return load_head(HEAD_PATH)
    torch.manual_seed(seed)
    return SalienceHead().eval()


def make_fpn(seed: int = 0) -> SeedFPN:
    if SEED_WEIGHTS.is_file():
        return load_fpn(SEED_WEIGHTS)
    torch.manual_seed(seed)
    return SeedFPN().eval()


# ----------------------------------------------------------------------------- straightforward
class StraightBank:
    """Bank + head layer by layer: per size, 12 even and 12 odd k x k convolutions, summed."""

    def __init__(self, head: SalienceHead) -> None:
        self.head = head.eval()
        self.kernels = []
        for k in BANK_SIZES:
            ev = np.stack([oriented_kernel(k, k, k - 1, t, "even") for t in bank_orientations()])[:, None]
            od = np.stack([oriented_kernel(k, k, k - 1, t, "odd") for t in bank_orientations()])[:, None]
            self.kernels.append((torch.from_numpy(ev).float(), torch.from_numpy(od).float(), k))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        resp = [F.conv2d(x, ev, padding=k // 2) + F.conv2d(x, od, padding=k // 2) for ev, od, k in self.kernels]
        return self.head(torch.cat(resp, dim=1))

    @staticmethod
    def flops_per_pixel() -> float:
        bank = sum(2 * BANK_ORIENTATIONS * k * k for k in BANK_SIZES) * 2
        head = (60 * 30 * 9 + 30 * 30 * 9 + 30) * 2
        return float(bank + head)


def fpn_flops_per_pixel() -> float:
    blocks = sum((6 + 12 + 2 * 144 * k * k + 24 + 2) * 2 for (_s, _l, k, _d, _p) in FPN_BLOCKS)
    return float(blocks + (9 * 4 * 9 + 4 * 4 * 9 + 4 * 9) * 2)


def straightforward_planes(
    volume: np.ndarray, model: Callable[[torch.Tensor], torch.Tensor], planes_per_orientation: int
) -> tuple[float, dict[tuple[int, int], np.ndarray]]:
    """Run the layer-by-layer model plane by plane in a zero canvas.

    Returns (seconds extrapolated to all planes of the volume, {(orientation, index): raw map}).
    """
    vol = torch.from_numpy(volume)
    total, outputs = 0.0, {}
    with torch.inference_mode():
        for o, name in enumerate(PLANES):
            planes = volume_planes(vol, name)
            n, _, ph, pw = planes.shape
            idx = np.arange(n) if planes_per_orientation <= 0 else np.unique(
                np.linspace(0, n - 1, min(n, planes_per_orientation)).round().astype(int))
            ch, cw = max(CANVAS, ph + 16), max(CANVAS, pw + 16)
            top, left = (ch - ph) // 2, (cw - pw) // 2
            t0 = time.perf_counter()
            for i in idx:
                x = standardise_planes(planes[i : i + 1].float())
                canvas = F.pad(x, (left, cw - pw - left, top, ch - ph - top))
                out = model(canvas)[:, :, top : top + ph, left : left + pw]
                outputs[(o, int(i))] = out[0, 0].numpy().copy()
            total += (time.perf_counter() - t0) * n / len(idx)
    return total, outputs


# ----------------------------------------------------------------------------- one case
def matmul_gflops(repeats: int = 5, n: int = 2048) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def run_case(shape: tuple[int, int, int], kind: str, repeats: int, baseline_planes: int,
             max_batch_voxels: int, what: str) -> dict:
    """``what``: 'ours' (timing and outputs of salience_3d), 'straight' or 'memory' (ours, once)."""
    vol = make_volume(shape)
    gen = BankGenerator(make_head()) if kind == "bank" else FPNGenerator(make_fpn())
    if what == "straight":
        model = StraightBank(make_head()) if kind == "bank" else make_fpn()
        secs, outs = straightforward_planes(vol, model, baseline_planes)
        return {"seconds": secs, "outputs": outs}
    if what == "memory":
        salience_3d(vol, gen, max_batch_voxels=max_batch_voxels)
        return {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    salience_3d(vol[:32, :32, :8], gen)  # warm-up (oneDNN primitive creation)
    ts, raw = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        raw = salience_3d(vol, gen, max_batch_voxels=max_batch_voxels, normalise=False)
        ts.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(ts), "raw": raw, "flops_px": gen.flops_per_pixel()}


def _in_child(args: tuple) -> dict:
    torch.set_num_threads(args[-1])
    return run_case(*args[:-1])


def child(args: tuple) -> dict:
    """Run one case in a fresh process, so its peak memory is its own."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_in_child, (args + (torch.get_num_threads(),),))


def parse_shape(s: str) -> tuple[int, int, int]:
    parts = s.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must be HxWxD, got {s!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=parse_shape, default=[(192, 192, 48), (512, 512, 120)])
    p.add_argument("--generators", nargs="+", choices=("bank", "fpn"), default=["bank", "fpn"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-planes", type=int, default=6,
                   help="planes per orientation for the straightforward implementation (0: all)")
    p.add_argument("--max-batch-voxels", type=int, default=1 << 21)
    p.add_argument("--quick", action="store_true", help="one 96x96x24 volume, 4 baseline planes per orientation")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.sizes, args.baseline_planes, args.repeats = [(96, 96, 24)], 4, 3
    load = os.getloadavg()
    print(f"# salience_3d CPU benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, load average {load[0]:.1f} "
          f"(machine shared with other processes when > 0)")
    print(f"# fpn weights: {'authors' if SEED_WEIGHTS.is_file() else 'random (authors file absent)'}; "
          f"bank head: {'shipped' if HEAD_PATH.is_file() else 'random (shipped head absent)'}")
    mm = matmul_gflops()
    print(f"# torch float32 matmul 2048^2: {mm:.1f} GFLOP/s (median of 5)\n")
    header = ("| volume | gen | ours s | straightforward s | speed-up | ours Mvox/s | straight Mvox/s | "
              "GFLOP/s executed | % matmul | GFLOP/s layer-equiv | max abs diff | peak GB |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for shape in args.sizes:
        for kind in args.generators:
            log.info("running %s %s ...", "x".join(map(str, shape)), kind)
            ours = child((shape, kind, args.repeats, args.baseline_planes, args.max_batch_voxels, "ours"))
            straight = child((shape, kind, 1, args.baseline_planes, args.max_batch_voxels, "straight"))
            mem = child((shape, kind, 1, args.baseline_planes, args.max_batch_voxels, "memory"))
            diff = max(float(np.abs(ours["raw"][o][_index(o, i)] - ref).max())
                       for (o, i), ref in straight["outputs"].items())
            vox = shape[0] * shape[1] * shape[2]
            px = 3 * vox
            gf = ours["flops_px"] * px / ours["seconds"] / 1e9
            equiv = (StraightBank.flops_per_pixel() if kind == "bank" else fpn_flops_per_pixel()) * px
            print(f"| {'x'.join(map(str, shape))} | {kind} | {ours['seconds']:.2f} | {straight['seconds']:.1f} | "
                  f"{straight['seconds'] / ours['seconds']:.1f}x | {vox / ours['seconds'] / 1e6:.2f} | "
                  f"{vox / straight['seconds'] / 1e6:.3f} | {gf:.1f} | {100 * gf / mm:.0f}% | "
                  f"{equiv / ours['seconds'] / 1e9:.0f} | {diff:.1e} | {mem['peak_gb']:.2f} |", flush=True)
            if diff > 1e-4:
                log.error("outputs differ by %.2e > 1e-4", diff)
                return 1
    print(f"\n# straightforward: {'all' if args.baseline_planes <= 0 else args.baseline_planes} planes per "
          f"orientation, time extrapolated to all planes; load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def _index(orientation: int, i: int) -> tuple:
    """Index of plane ``i`` of an orientation inside one (H, W, D) channel."""
    return [(slice(None), slice(None), i), (i,), (slice(None), i)][orientation]


if __name__ == "__main__":
    sys.exit(run_recorded(main, "salience_3d speed against the straightforward bank + head, seconds per volume"))
