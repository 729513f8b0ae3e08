"""Training throughput of the real trainer against the same model fed in-memory tensors.

    .venv/bin/python bench/train_bench.py [--presets demo full] [--sizes 128 256] [--base 16]
        [--batch 4] [--workers 0 2] [--salience offline none] [--cache_data 1] [--iters 20]
        [--repeats 3] [--amp 1] [--data data/bench]

"trainer" runs ``trainer.train`` itself (one persistent DataLoader, SliceDataSet over the
HDF5 slice files with rot/flip and the resize to ``--sizes``, loss checks every 5 steps,
validation only at the end) for ``--warmup`` + ``--iters`` iterations and takes its speed
between two loss checks (``TrainResult.flush_times``: the device had finished those
iterations), so start-up and the final validation are not counted. "memory" runs the same
model, loss, optimiser, schedule and loss checks on one batch of random tensors already on
the device. ratio = trainer / memory: 1.0 means the data pipeline costs nothing.

Data: phantom patients made by make_phantoms.py, preprocess.py and salience_generation.py
(analytic generator) under ``--data`` (git-ignored; reused when complete): the ``demo``
preset (192 x 192 slices, epochs of ~24 iterations at batch 4) and the ``full`` preset
(512 x 512 slices, whole-abdomen field of view). Prints a Markdown table of medians over
``--repeats`` runs, with the machine and its load average.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.records import run_recorded  # noqa: E402

from losses import make_loss, make_optimizer, poly_scheduler  # noqa: E402
from networks.e2e import build_segmenter  # noqa: E402
from train_config import TrainConfig  # noqa: E402
from trainer import backward_step, forward_loss, seed_everything, setup_env, train  # noqa: E402

PRESET_CASES = {"demo": (4, "50/25/25"), "full": (2, "50/50/0")}
WARMUP_CHECK = 5  # iterations between loss checks (and the warm-up)


def prepare(preset: str, data: Path) -> tuple[str, Path, Path]:
    """(dataset name, root_path, list_dir) of a phantom dataset of ``preset``, made if missing."""
    dataset, root, lists = f"bench_{preset}", data, data / "list"
    done = lists / dataset / "slice_train.txt"
    if done.is_file() and (root / dataset / "vol_salience").is_dir():
        return dataset, root, lists
    cases, split = PRESET_CASES[preset]
    raw = data / f"raw_{preset}"
    py = sys.executable
    for cmd in ([py, "make_phantoms.py", "--out", str(raw), "--cases", str(cases), "--preset", preset, "--seed", "0",
                 "--workers", str(min(cases, os.cpu_count() or 1)), "--overwrite"],
                [py, "preprocess.py", "--dataset", dataset, "--src", str(raw), "--root_path", str(root),
                 "--list_dir", str(lists), "--split", split, "--workers", str(min(cases, os.cpu_count() or 1))],
                [py, "salience_generation.py", "--dataset", dataset, "--root_path", str(root), "--list_dir",
                 str(lists), "--generator", "analytic"]):
        logging.info("%s", " ".join(cmd[1:]))
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return dataset, root, lists


def trainer_speed(cfg: TrainConfig, clock: str) -> float:
    """Iterations/s of trainer.train between the first loss check after warm-up and the last.

    ``clock`` "cpu": per second of this process's CPU time (load-independent; only
    meaningful with no loader workers, whose CPU time it does not see).
    """
    result = train(cfg)
    k = 1 if clock == "wall" else 2
    times = [(f[0], f[k]) for f in result.flush_times if f[0] >= WARMUP_CHECK]
    (i0, t0), (i1, t1) = times[0], times[-1]
    return (i1 - i0) / (t1 - t0)


def memory_speed(cfg: TrainConfig, iters: int, clock: str) -> float:
    """Iterations/s of the same training step on one batch of random tensors on the device."""
    env = setup_env(cfg)
    seed_everything(cfg.seed, cfg.deterministic)
    if cfg.channels_last:
        env.memory_format = torch.channels_last
    model = build_segmenter(cfg.backbone, cfg.salience, 1, cfg.model_kwargs).to(env.device,
                                                                              memory_format=env.memory_format)
    model.train()
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.base_lr, cfg.weight_decay, cfg.momentum)
    scheduler = poly_scheduler(optimizer, 10 ** 6, cfg.poly_power)
    scaler = torch.amp.GradScaler("cuda", enabled=env.amp_dtype == torch.float16)
    loss_fn = make_loss(cfg.loss)
    c = 3 if cfg.salience == "offline" else 1
    shape = (cfg.batch_size, c, *cfg.img_size)
    batch = {"input": torch.rand(shape, device=env.device),
             "label": (torch.rand((cfg.batch_size, 1, *cfg.img_size), device=env.device) > 0.9).float()}
    now = time.monotonic if clock == "wall" else time.process_time
    t0 = 0.0
    for it in range(WARMUP_CHECK + iters):
        _, loss = forward_loss(model, batch, loss_fn, env)
        backward_step(model, loss, optimizer, scaler)
        scheduler.step()
        if (it + 1) % WARMUP_CHECK == 0:
            float(loss.detach())  # the trainer's loss check: one sync
            if it + 1 == WARMUP_CHECK:
                t0 = now()
    return iters / (now() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["demo", "full"], choices=tuple(PRESET_CASES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="img_size (square), pixels")
    ap.add_argument("--base", type=int, default=16, help="unet base channels (the seed's: 64)")
    ap.add_argument("--batch", type=int, nargs="+", default=[4])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--salience", nargs="+", default=["offline", "none"], choices=("offline", "none", "e2e"))
    ap.add_argument("--cache_data", type=int, nargs="+", default=[1], choices=(0, 1))
    ap.add_argument("--channels_last", type=int, default=0, choices=(0, 1))
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per run (a multiple of 5)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--amp", type=int, default=1, choices=(0, 1), help="AMP on CUDA (bf16, else fp16)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="cpu: iterations per CPU second of the process (a shared, loaded CPU machine; "
                         "--workers 0 only)")
    ap.add_argument("--data", default=str(ROOT / "data" / "bench"), help="phantom data folder (made if missing)")
    args = ap.parse_args()
    if args.iters % WARMUP_CHECK:
        ap.error(f"--iters must be a multiple of {WARMUP_CHECK}")
    if args.clock == "cpu" and (args.workers != [0] or args.device == "cuda"):
        ap.error("--clock cpu counts this process's CPU time only: use it with --workers 0 on the CPU")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    data = Path(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            dataset, root, lists = prepare(preset, data)
            for size, batch, workers, sal, cache in itertools.product(args.sizes, args.batch, args.workers,
                                                                       args.salience, args.cache_data):
                cfg_kw = dict(dataset=dataset, root_path=str(root), list_dir=str(lists), backbone="unet",
                              salience=sal, model_kwargs={"base_channels": args.base}, img_size=(size, size),
                              batch_size=batch, num_workers=workers, cache_data=bool(cache), amp=bool(args.amp),
                              device=args.device, channels_last=bool(args.channels_last), log_every=WARMUP_CHECK,
                              max_iterations=WARMUP_CHECK + args.iters, val_every=10 ** 9, max_epochs=1000,
                              output_root=tmp, overwrite=True)
                tr, mem = [], []
                for r in range(args.repeats):
                    tr.append(trainer_speed(TrainConfig(**cfg_kw, exp=f"r{r}"), args.clock))
                    mem.append(memory_speed(TrainConfig(**cfg_kw), args.iters, args.clock))
                t, m = statistics.median(tr), statistics.median(mem)
                rows.append((preset, size, batch, workers, sal, cache, t, m))
                print(f"{preset} {size}px batch {batch} workers {workers} {sal} cache {cache}: trainer {t:.2f} it/s, "
                      f"memory {m:.2f} it/s, ratio {t / m:.2f}", flush=True)
    cuda = args.device != "cpu" and torch.cuda.is_available()
    dev = torch.cuda.get_device_name(0) if cuda else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    load = "%.1f %.1f %.1f" % os.getloadavg()
    print(f"\nmachine: {platform.node()} | device: {dev} | load average {load} | torch {torch.__version__} | "
          f"unet base {args.base} | amp {bool(args.amp) and cuda} | channels_last {bool(args.channels_last)} | "
          f"clock {args.clock} | median of {args.repeats} runs x {args.iters} iterations\n")
    print("| data | img | batch | workers | salience | cache_data | trainer it/s | in-memory it/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, size, batch, workers, sal, cache, t, m in rows:
        print(f"| {preset} | {size} | {batch} | {workers} | {sal} | {cache} | {t:.2f} | {m:.2f} | {t / m:.2f} |")


if __name__ == "__main__":
    sys.exit(run_recorded(main, "training throughput: trainer.train against an in-memory loop, iterations per second"))
