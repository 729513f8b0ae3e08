"""Training throughput: the real data pipeline against the same model on in-memory tensors.

    .venv/bin/python bench/train_bench.py [--mode 2d 3d] [--iters 10] [--repeats 3] [--workers 2]

2-D: the seed's ``unet`` on 256 x 256 slices read through SliceDataSet (HDF5 slice files,
offline salience gating, rot/flip, no resize) and a DataLoader; 3-D: ``unet3d`` on 64^3
patches from PatchDataSet over cached volumes. "memory" runs the identical training step
(trainer.forward_loss + trainer.backward_step) on random tensors already on the device.
The pipeline cost is 1 - pipeline / memory throughput (target <= 10%); "loader alone"
is what the DataLoader delivers with no model (the ceiling for a fast GPU). Data are synthetic
volumes written in the project's HDF5 layout to a temporary folder. Prints a Markdown
table of medians over ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders.datasets import PatchDataSet, SliceDataSet, VolumeDataSet  # noqa: E402
from losses import make_loss, make_optimizer  # noqa: E402
from networks.e2e import build_segmenter  # noqa: E402
from trainer import Env, backward_step, forward_loss  # noqa: E402
from utils.h5io import (DatasetPaths, Volume, slice_name, write_list, write_salience, write_slice,  # noqa: E402
                        write_volume)


def synthetic_dataset(root: Path, shape: tuple[int, int, int], cases: int, seed: int = 0) -> DatasetPaths:
    """Cases with a few random tubes as vessels, salience, slice files and lists."""
    rng = np.random.default_rng(seed)
    paths = DatasetPaths.of(root / "data", "bench", root / "list")
    h, w, d = shape
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    slices, names = [], []
    for i in range(cases):
        name = f"case{i + 1:04d}"
        names.append(name)
        label = np.zeros(shape, np.uint8)
        for _ in range(4):
            r0, c0, dr, dc = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w), *rng.normal(0, 0.5, 2)
            for z in range(d):
                label[:, :, z] |= ((r - r0 - dr * z) ** 2 + (c - c0 - dc * z) ** 2 <= 9).astype(np.uint8)
        image = np.clip(0.25 + 0.2 * label + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32)
        sal = np.stack([image] * 3)
        write_volume(paths.volume(name), Volume(image=image, label=label))
        write_salience(paths.salience(name), sal, generator="bench")
        for z in range(d):
            nm = slice_name(name, z)
            write_slice(paths.slice(nm), image[:, :, z], label[:, :, z], sal[:, :, :, z])
            slices.append(nm)
    write_list(paths.list_file("vol_train"), names)
    write_list(paths.list_file("slice_train"), slices)
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _throughput(step: Callable[[dict], None], batches: Iterator[dict], iters: int, batch_size: int,
                device: torch.device) -> float:
    """Items per second over ``iters`` steps after two warm-up steps."""
    for _ in range(2):
        step(next(batches))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step(next(batches))
    _sync(device)
    return iters * batch_size / (time.perf_counter() - t0)


def _forever(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def bench(mode: str, args: argparse.Namespace, paths: DatasetPaths, env: Env) -> dict:
    if mode == "2d":
        name, kw, size = "unet", {"base_channels": args.base_2d}, (256, 256)
        dataset = SliceDataSet(paths, "offline", img_size=size, seed=0)
        shape = (args.batch_2d, 3) + size
        batch_size = args.batch_2d
    else:
        name, kw, size = "unet3d", {"base_channels": args.base_3d}, (64, 64, 64)
        dataset = PatchDataSet(VolumeDataSet(paths, "train", "offline"), size, samples_per_epoch=10**6, seed=0)
        shape = (args.batch_3d, 3) + size
        batch_size = args.batch_3d
    torch.manual_seed(0)
    model = build_segmenter(name, "offline", model_kwargs=kw).to(env.device).train()
    optimizer = make_optimizer("sgd", model.parameters(), 0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=env.amp_dtype == torch.float16)
    loss_fn = make_loss("bce")

    def step(batch: dict) -> None:
        _, loss = forward_loss(model, batch, loss_fn, env)
        backward_step(model, loss, optimizer, scaler)

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=args.workers, drop_last=True,
                        pin_memory=env.device.type == "cuda", persistent_workers=args.workers > 0)
    mem_batch = {"input": torch.rand(shape, device=env.device),
                 "label": (torch.rand((shape[0], 1) + shape[2:], device=env.device) > 0.9).float()}
    pipe_it = _forever(loader)
    pipe, mem, alone = [], [], []
    for _ in range(args.repeats):
        mem.append(_throughput(step, iter(lambda: mem_batch, None), args.iters, batch_size, env.device))
        pipe.append(_throughput(step, pipe_it, args.iters, batch_size, env.device))
        # the loader with no model: how many items/s the workers can deliver at most
        alone.append(_throughput(lambda b: b["input"].to(env.device), pipe_it, 4 * args.iters, batch_size,
                                 env.device))
    p, m = statistics.median(pipe), statistics.median(mem)
    return {"mode": mode, "model": f"{name} {kw}", "size": "x".join(map(str, size)), "batch": batch_size,
            "pipeline": p, "memory": m, "cost": 1 - p / m, "loader": statistics.median(alone)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", nargs="+", default=["2d", "3d"], choices=("2d", "3d"))
    ap.add_argument("--iters", type=int, default=10, help="timed steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch_2d", type=int, default=4)
    ap.add_argument("--batch_3d", type=int, default=2)
    ap.add_argument("--base_2d", type=int, default=64, help="unet base channels (the seed's: 64)")
    ap.add_argument("--base_3d", type=int, default=16)
    ap.add_argument("--volume", type=int, nargs=3, default=[256, 256, 48], help="synthetic case size H W D")
    ap.add_argument("--cases", type=int, default=2)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    env = Env(torch.device("cuda" if cuda else "cpu"),
              amp_dtype=(torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else
                         torch.float16 if cuda else None))
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_dataset(Path(tmp), tuple(args.volume), args.cases)
        rows = [bench(m, args, paths, env) for m in args.mode]
    dev = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                     f"{torch.get_num_threads()} threads)"
    print(f"\nmachine: {platform.node()} | device: {dev} | amp: {env.amp_dtype} | torch {torch.__version__} | "
          f"loader workers: {args.workers} | median of {args.repeats} runs x {args.iters} steps\n")
    print("| mode | model | input | batch | pipeline items/s | in-memory items/s | pipeline cost | loader alone items/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['model']} | {r['size']} | {r['batch']} | {r['pipeline']:.2f} | {r['memory']:.2f} "
              f"| {100 * r['cost']:.1f}% | {r['loader']:.1f} |")


if __name__ == "__main__":
    main()
