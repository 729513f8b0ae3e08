"""Speed of the ``e2e`` salience module against the authors' module, on the three planes of a patch.

    python bench/e2e_salience_bench.py --device cpu --threads 2           # 96^3, fp32
    python bench/e2e_salience_bench.py --device cuda --amp                # bf16 autocast
    python bench/e2e_salience_bench.py --device cpu --threads 2 --size 64 --repeats 3

Ours: ``networks.salience.SalienceModule`` on (B, 1, S, S, S) -> (B, 3, S, S, S): bank folded
into the head's first convolution (exact outer-ring correction), the three plane stacks of a
cube in one call per layer, a hand-written backward of the head (in-place ReLU masks, one
30-channel map allocated per chunk), on the CPU in chunks of 2^18 pixels with NCHW maps.

Authors': a re-implementation (written here, not their code) of the e2e ``Salience`` module of
their latest release (lzhLab/ConSalience, ``networks/salience_generator.py``) and of how their
3-D network applies it (``networks/unet3d_with_salience.py``):

- for each kernel size k in 3..11, 12 even and 12 odd k x k kernels as two separate
  ``conv2d`` calls with padding k // 2, summed (10 bank convolutions), ``torch.cat`` of the five
  12-channel responses, then the head (non-in-place ReLUs), all in NCHW;
- the module takes a (B, 1, H, W, D) tensor and treats its last dimension as the plane index
  (``permute(4, 0, 1, 2, 3).contiguous().view(D * B, 1, H, W)``, and back with a view and a
  permute); the network calls it three times, on the input and on two transposed views
  of it, and concatenates the three results along channels.

Two deliberate differences, neither changing the work done: the coronal call permutes the
input to (B, 1, W, D, H) (planes W x D, docs/DESIGN.md section 1) where their ``transpose(4, 2)``
gives D x W planes (the head is not symmetric under transposition, so their coronal maps are
other numbers), and the channels are concatenated (transverse, coronal, sagittal) where they
concatenate (coronal, sagittal, transverse). With those, both modules compute the same
function, and the table reports the largest difference of their outputs (and of the head
gradients) in float32.

Timings: median of ``--repeats`` runs after one warm-up, ours and theirs alternating (a shared
machine's load then weighs on both alike). "forward" runs under
``torch.no_grad`` (inference, e.g. salience maps from an e2e model); "forward+backward" is a
training step's share: forward with autograd, then ``backward`` of a fixed random output
gradient into the head's parameters (the input needs no gradient, as in training). ``--amp``
runs both under ``torch.autocast`` (bfloat16 where supported, else float16); equality is
checked in float32 without autocast (TF32 off on the GPU for the check; the timings use torch's
defaults), plus the AMP outputs' difference for information.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.records import run_recorded  # noqa: E402

from networks.salience import (  # noqa: E402
    BANK_SIZES,
    SalienceHead,
    SalienceModule,
    bank_orientations,
    oriented_kernel,
)


# ----------------------------------------------------------------------------- the authors' module
def _parity_kernels(k: int, parity: str, device: torch.device) -> Tensor:
    """12 oriented k x k kernels of one parity, (12, 1, k, k) float32, sigma = k, lambda = k - 1."""
    ker = np.stack([oriented_kernel(k, k, k - 1, t, parity) for t in bank_orientations()])[:, None]
    return torch.from_numpy(ker).float().to(device)


class AuthorsSalience(nn.Module):
    """The authors' e2e ``Salience`` as they compute it: (B, 1, H, W, D) -> (B, 1, H, W, D).

    Planes are x[..., i] (H x W); per size, separate even and odd convolutions; head as
    ``out_conv`` (same state-dict keys as :class:`SalienceHead`, so the same weights load).
    The kernels are plain attributes on ``device`` (their module creates them with ``.cuda()``).
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.kernels = [(_parity_kernels(k, "even", device), _parity_kernels(k, "odd", device), k) for k in BANK_SIZES]
        c = len(BANK_SIZES) * 12
        self.out_conv = nn.Sequential(
            nn.Conv2d(c, c // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c // 2, c // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c // 2, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w, d = x.shape
        planes = x.permute(4, 0, 1, 2, 3).contiguous().view(d * b, 1, h, w)
        resp = [F.conv2d(planes, ev, padding=k // 2) + F.conv2d(planes, od, padding=k // 2) for ev, od, k in self.kernels]
        out = self.out_conv(torch.cat(resp, dim=1))
        return out.view(d, b, 1, h, w).permute(1, 2, 3, 4, 0)


def authors_three_planes(module: AuthorsSalience, x: Tensor) -> Tensor:
    """Their three calls on a (B, 1, H, W, D) patch -> (B, 3, H, W, D) (transverse, coronal, sagittal)."""
    t = module(x)
    c = module(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)  # planes W x D (theirs: D x W)
    s = module(x.transpose(4, 3)).transpose(4, 3)  # planes H x D
    return torch.cat([t, c, s], dim=1)


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(
    fn_a: Callable[[], None], fn_b: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1
) -> tuple[float, float]:
    """Median wall times (s) of ``fn_a`` and ``fn_b``, run alternately ``repeats`` times after
    ``warmup`` runs each, so that both see the same load of a shared machine."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, acc in ((fn_a, times[0]), (fn_b, times[1])):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def amp_dtype(device: torch.device) -> torch.dtype:
    """Training's autocast dtype (trainer.cuda_amp_dtype) on CUDA; bf16 on the CPU."""
    from trainer import cuda_amp_dtype

    return cuda_amp_dtype() if device.type == "cuda" else torch.bfloat16


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def run(
    device: torch.device, amp: bool, size: int, batch: int, repeats: int, seed: int = 0
) -> dict:
    """Time both modules on a (batch, 1, size, size, size) patch; returns the numbers of the table."""
    torch.manual_seed(seed)
    head = SalienceHead()
    ours = SalienceModule(head).to(device).train()
    theirs = AuthorsSalience(device).to(device).train()
    theirs.out_conv.load_state_dict(head.out_conv.state_dict())
    x = torch.rand(batch, 1, size, size, size, device=device)
    grad_out = torch.rand(batch, 3, size, size, size, device=device)

    # equality, float32 (outputs and head gradients); TF32 off on the GPU for this check only
    outs, grads = [], []
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for fn, params in ((ours, list(ours.head.parameters())), (lambda v: authors_three_planes(theirs, v),
                                                                   list(theirs.out_conv.parameters()))):
            y = fn(x)
            grads.append(torch.autograd.grad(y, params, grad_out))
            outs.append(y.detach())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    diff_out = float((outs[0] - outs[1]).abs().max())
    diff_grad = max(float(((a - b).abs().max() / b.abs().max().clamp(min=1e-30))) for a, b in zip(*grads))
    del outs, grads

    dtype = amp_dtype(device) if amp else None

    def ctx() -> torch.autocast:
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=amp)

    diff_amp: Optional[float] = None
    if amp:
        with torch.no_grad(), ctx():
            diff_amp = float((ours(x).float() - authors_three_planes(theirs, x).float()).abs().max())

    def fwd(fn: Callable[[Tensor], Tensor]) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad(), ctx():
                fn(x)
        return go

    def fwd_bwd(fn: Callable[[Tensor], Tensor], module: nn.Module) -> Callable[[], None]:
        def go() -> None:
            module.zero_grad(set_to_none=True)
            with ctx():
                y = fn(x)
            y.backward(grad_out.to(y.dtype))
        return go

    def authors(v: Tensor) -> Tensor:
        return authors_three_planes(theirs, v)

    res = {
        "fwd": time_pair(fwd(ours), fwd(authors), device, repeats),
        "fwd+bwd": time_pair(fwd_bwd(ours, ours), fwd_bwd(authors, theirs), device, repeats),
        "diff_out": diff_out,
        "diff_grad": diff_grad,
        "diff_amp": diff_amp,
        "amp_dtype": str(dtype).replace("torch.", "") if dtype else "float32",
    }
    return res


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="run both under torch.autocast (bf16 where supported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=96, help="patch edge S: input (batch, 1, S, S, S)")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("e2e_salience_bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.size < 1 or args.repeats < 1 or args.batch < 1:
        print("e2e_salience_bench: --size, --repeats and --batch must be positive", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    load0 = os.getloadavg()
    r = run(device, args.amp, args.size, args.batch, args.repeats)
    load1 = os.getloadavg()
    s = args.size
    print(f"e2e salience, three planes of ({args.batch}, 1, {s}, {s}, {s}) -> ({args.batch}, 3, {s}, {s}, {s}); "
          f"device {args.device}, {'AMP ' + r['amp_dtype'] if args.amp else 'float32'}, "
          f"{torch.get_num_threads()} CPU threads; median of {args.repeats}")
    print(f"machine: {machine(device)}")
    print(f"load average (1 min) before / after: {load0[0]:.2f} / {load1[0]:.2f}")
    print()
    print(f"| {'pass':<16} | {'ours ms':>9} | {'authors ms':>10} | {'speed-up':>8} |")
    print(f"|{'-' * 18}|{'-' * 10}:|{'-' * 11}:|{'-' * 9}:|")
    for key, label in (("fwd", "forward"), ("fwd+bwd", "forward+backward")):
        ours_t, theirs_t = r[key]
        print(f"| {label:<16} | {ours_t * 1e3:9.1f} | {theirs_t * 1e3:10.1f} | {theirs_t / ours_t:7.2f}x |")
    print()
    print(f"max |ours - authors'| output, float32: {r['diff_out']:.2e} (must be <= 1e-4); "
          f"head gradients, relative to their largest: {r['diff_grad']:.2e}")
    if r["diff_amp"] is not None:
        print(f"max |ours - authors'| output under AMP ({r['amp_dtype']}, both): {r['diff_amp']:.2e}")
    return 0 if r["diff_out"] <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(run_recorded(main, "e2e salience module forward and backward against the authors' formulation, milliseconds"))
