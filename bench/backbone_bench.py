"""Backbones: parameter count and one forward + backward pass, median of several runs.

    .venv/bin/python bench/backbone_bench.py [--names unet unext ...] [--size 256] [--repeats 3] [--threads N]
        [--record NAME]

Each 2-D backbone (the built-in ones and every registered 2-D plug-in of networks/plugins/ unless
--names chooses) is built at its default (paper / seed) sizes with 3 input channels and 1
output channel, and timed on one (1, 3, size, size) batch in training mode: forward, mean of
the logits, backward. One untimed warm-up run precedes the timed ones. Prints a Markdown
table, the machine, the thread count and the load average (timings on a shared machine
move with its load).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.records import run_recorded  # noqa: E402

from networks.registry import build_model, plugin_names, spatial_dims_of  # noqa: E402

DEFAULT_NAMES = ("unet", "unet_bilinear", "attention_unet", "unetpp", "unext", "transunet", "ynet")


def default_names() -> list[str]:
    """The built-in 2-D backbones above, then every registered 2-D plug-in (yours is compared too)."""
    return list(DEFAULT_NAMES) + [n for n in plugin_names(2) if n not in DEFAULT_NAMES]


def time_step(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward of ``model`` on ``x`` (one warm-up run first)."""
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(x).mean().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", nargs="+", default=None, help="backbones (default: the built-in 2-D ones and "
                                                                "every 2-D plug-in)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.names = args.names or default_names()
    for name in args.names:
        try:
            dims = spatial_dims_of(name)
        except ValueError as e:  # an unknown name: the valid ones, not a traceback
            raise SystemExit(f"error: {e}") from None
        if dims != 2:
            raise SystemExit(f"error: {name}: not a 2-D backbone")
    torch.manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size)
    rows = []
    for name in args.names:
        try:
            model = build_model(name, 3, 1).train()
            rows.append((name, sum(q.numel() for q in model.parameters()), time_step(model, x, args.repeats)))
        except Exception as e:  # noqa: BLE001 - a plug-in that cannot run at its defaults: a row, not the end
            print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
            rows.append((name, None, None))
        model = None
    print(f"\nmachine: {platform.node()} | CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads | load average {os.getloadavg()}")
    print(f"input (1, 3, {args.size}, {args.size}), training mode, forward + backward, median of {args.repeats}\n")
    print("| backbone | parameters | forward + backward (s) |")
    print("|---|---:|---:|")
    for name, n, t in rows:
        print(f"| {name} | {'n/a' if n is None else f'{n:,}'} | {'failed' if t is None else f'{t:.3g}'} |")


if __name__ == "__main__":
    sys.exit(run_recorded(main, "backbone parameters and forward + backward time"))
