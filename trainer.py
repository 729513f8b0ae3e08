"""Training loop behind main.py: one code path for CPU, one GPU and DDP under torchrun.

``train(cfg)`` builds the model (networks.e2e.build_segmenter), the data
(2-D: dataloaders.datasets.SliceDataSet on ``slice_train``; 3-D: PatchDataSet over
``vol_train``), loss, optimiser and the seed's poly schedule, and trains:

- AMP on CUDA: bf16 where the GPU supports it, else fp16 with a GradScaler; fp32 on CPU.
- DDP when launched by torchrun (WORLD_SIZE > 1): DistributedSampler, nccl on CUDA and
  gloo on the CPU; rank 0 alone validates, logs and writes files.
- Validation on ``vol_val`` every epoch (or every ``val_every`` iterations) with
  inference.predict_volume and evaluation.metrics (Dice, clDice of the 0.5-thresholded
  probabilities, mean over cases); ``best_model.pth`` keeps the best validation Dice (the
  seed's rule), ``last.pth`` the latest state; both are contract-1 checkpoints written
  atomically. ``resume`` continues from ``last.pth`` exactly (same weights as an
  uninterrupted run on the CPU with ``deterministic``).
- Run folder ``<output_root>/<dataset>/<backbone>/epo<E>_bs<B>_lr<L>/<exp>`` with
  config.json, train.log, TensorBoard events (train/loss, train/lr, val/dice,
  val/cldice, an image grid: image | salience | prediction | label).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler
from tqdm import tqdm

from dataloaders.datasets import PatchDataSet, SliceDataSet, VolumeDataSet
from dataloaders.inputs import input_channels
from evaluation.metrics import cldice as cldice_metric
from evaluation.metrics import dice as dice_metric
from inference import binarize, predict_volume
from losses import make_loss, make_optimizer, poly_scheduler
from networks.checkpoint import (
    check_compatible,
    find_offline_generator,
    init_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unwrap,
)
from networks.e2e import E2ESegmenter, build_segmenter
from networks.registry import resolve_kwargs, spatial_dims_of
from utils.atomic import atomic_path
from utils.h5io import DatasetPaths
from utils.logging_setup import setup_logging

log = logging.getLogger("trainer")


class TrainingError(RuntimeError):
    """A training run cannot go on (NaN loss, ...); the message is one line for the user."""


@dataclass
class TrainConfig:
    """Every training option; main.py fills it from the command line (same names)."""

    dataset: str
    backbone: str = "unet"
    salience: str = "offline"
    root_path: str = "data"
    list_dir: str = "list"
    output_root: str = "checkpoint"
    exp: Optional[str] = None  # default: the salience mode
    model_kwargs: dict = field(default_factory=dict)
    head: Optional[str] = None
    max_epochs: int = 100
    batch_size: int = 4
    base_lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    loss: str = "bce"
    cldice_iterations: int = 5
    clip_grad: float = 0.0
    img_size: Sequence[int] = (256, 256)
    target_spacing: Optional[float] = None  # mm per pixel in-plane (2-D); None: pixel resize to img_size
    init_from: Optional[str] = None  # checkpoint whose weights start this run
    patch_size: Sequence[int] = (64, 64, 64)
    patches_per_epoch: int = 250
    fg_fraction: float = 1 / 3
    augment: bool = True
    intensity_jitter: bool = False
    max_iterations: Optional[int] = None
    max_minutes: Optional[float] = None
    stop_after_epochs: Optional[int] = None
    val_every: int = 0
    val_batch_size: int = 8
    val_overlap: float = 0.5
    num_workers: int = 2
    seed: int = 1234
    deterministic: bool = True
    amp: bool = True
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.img_size = [int(s) for s in self.img_size]
        self.patch_size = [int(s) for s in self.patch_size]
        if len(self.img_size) != 2 or min(self.img_size) < 1:
            raise ValueError(f"--img_size needs two positive integers H W, got {self.img_size}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"--patch_size needs three positive integers h w d, got {self.patch_size}")
        if self.batch_size < 1 or self.max_epochs < 1:
            raise ValueError(f"--batch_size and --max_epochs must be >= 1, got {self.batch_size}, {self.max_epochs}")
        if self.base_lr <= 0:
            raise ValueError(f"--base_lr must be > 0, got {self.base_lr}")
        if self.target_spacing is not None and not self.target_spacing > 0:
            raise ValueError(f"--target_spacing must be a positive number of mm, got {self.target_spacing}")
        input_channels(self.salience)
        if self.exp is None:
            self.exp = self.salience

    def run_dir(self) -> Path:
        """The seed's layout: <output_root>/<dataset>/<backbone>/epo<E>_bs<B>_lr<L>/<exp>."""
        backbone = self.backbone.replace(":", "_")
        return (Path(self.output_root) / self.dataset / backbone
                / f"epo{self.max_epochs}_bs{self.batch_size}_lr{self.base_lr:g}" / str(self.exp))

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


@dataclass
class TrainResult:
    """How a run ended; ``main`` is True on the process that wrote the files (rank 0)."""

    main: bool
    run_dir: Path
    epoch: int
    iteration: int
    best_metric: float
    losses: list[float]
    stopped_by: str


# --------------------------------------------------------------------------- environment


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    amp_dtype: Optional[torch.dtype] = None  # None: fp32
    distributed: bool = False  # launched by torchrun (DDP, even with one process)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env(cfg: TrainConfig) -> Env:
    """Device, DDP process group (under torchrun, which sets RANK and WORLD_SIZE), AMP dtype."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        use_cuda = torch.cuda.is_available()
    elif cfg.device in ("cuda", "cpu"):
        use_cuda = cfg.device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available")
    else:
        raise ValueError(f"--device must be auto, cuda or cpu, got {cfg.device!r}")
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if distributed and not dist.is_initialized():
        # rank 0 validates alone while the others wait in a collective: allow long validations
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    amp_dtype = None
    if use_cuda and cfg.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Env(device, rank, local, world, amp_dtype, distributed)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this for deterministic matmuls; harmless on the CPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        # warn_only: a few CUDA backward kernels (e.g. bilinear up-sampling) have no
        # deterministic version; training should not die for it
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


class _EpochSampler(Sampler[int]):
    """A shuffled order fixed by (seed, epoch), optionally skipping the first ``skip`` items.

    Skipping lets a run resumed in the middle of an epoch see exactly the batches the
    interrupted run had not seen yet.
    """

    def __init__(self, base: Sampler[int], skip: int = 0) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.base)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- data


def check_dataset(cfg: TrainConfig) -> DatasetPaths:
    paths = DatasetPaths.of(cfg.root_path, cfg.dataset, cfg.list_dir)
    if not paths.root.is_dir():
        raise FileNotFoundError(f"{paths.root}: dataset folder not found (unknown --dataset {cfg.dataset!r}? "
                                f"run preprocess.py --dataset {cfg.dataset} first)")
    if not paths.list_dir.is_dir():
        raise FileNotFoundError(f"{paths.list_dir}: list folder for dataset {cfg.dataset!r} not found")
    return paths


def build_train_set(cfg: TrainConfig, paths: DatasetPaths, dims: int) -> torch.utils.data.Dataset:
    if dims == 2:
        return SliceDataSet(paths, cfg.salience, img_size=cfg.img_size, augment=cfg.augment,
                            jitter=cfg.intensity_jitter, seed=cfg.seed, target_spacing=cfg.target_spacing)
    volumes = VolumeDataSet(paths, "train", cfg.salience)
    return PatchDataSet(volumes, cfg.patch_size, cfg.patches_per_epoch, fg_fraction=cfg.fg_fraction,
                        augment=cfg.augment, jitter=cfg.intensity_jitter, seed=cfg.seed)


def make_loader(cfg: TrainConfig, env: Env, dataset: Any, epoch: int, skip: int) -> DataLoader:
    if env.distributed:
        base: Sampler[int] = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                                shuffle=True, seed=cfg.seed)
        base.set_epoch(epoch)
    else:
        base = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    dataset.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=_EpochSampler(base, skip),
                      num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda", drop_last=False)


def batches_per_epoch(cfg: TrainConfig, env: Env, n_items: int) -> int:
    per_rank = math.ceil(n_items / env.world_size) if env.distributed else n_items
    return math.ceil(per_rank / cfg.batch_size)


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: nn.Module, cases: VolumeDataSet, cfg: TrainConfig, env: Env, dims: int) -> dict[str, float]:
    """Mean Dice and clDice over the validation cases (prediction = inference.binarize(probability))."""
    model = unwrap(model)
    dices, cldices = [], []
    for i in range(len(cases)):
        case = cases[i]
        with torch.autocast(env.device.type, dtype=env.amp_dtype or torch.float32, enabled=env.amp_dtype is not None):
            prob = predict_volume(
                model, case.image, case.salience, salience_mode=cfg.salience, spatial_dims=dims,
                img_size=cfg.img_size if dims == 2 else None, patch_size=cfg.patch_size if dims == 3 else None,
                target_spacing=cfg.target_spacing, spacing=case.spacing,
                overlap=cfg.val_overlap, batch_size=cfg.val_batch_size, device=env.device,
            )
        pred = binarize(prob)
        dices.append(dice_metric(pred, case.label))
        cldices.append(cldice_metric(pred, case.label))
    # cases with an empty truth and prediction give NaN; they carry no information
    return {"dice": float(np.nanmean(dices)) if not np.all(np.isnan(dices)) else 0.0,
            "cldice": float(np.nanmean(cldices)) if not np.all(np.isnan(cldices)) else 0.0}


def image_grid(model: nn.Module, batch: dict, logits: torch.Tensor, salience_mode: str) -> np.ndarray:
    """(1, H, 4W) float in [0, 1]: image | salience (transverse) | probability | label of sample 0.

    3-D samples show their middle slice along D.
    """
    image = batch["image"][:1].float()
    model = unwrap(model)
    if salience_mode == "offline":
        # input channel 0 is G + G * S_t: recover S_t where G > 0
        g = image[:, 0]
        sal = torch.where(g > 1e-6, batch["input"][:1, 0].float() / g.clamp_min(1e-6) - 1, torch.zeros_like(g))
    elif salience_mode == "e2e" and isinstance(model, E2ESegmenter):
        with torch.no_grad():
            sal = model.salience(image.to(next(model.parameters()).device))[:, 0].float().cpu()
    else:
        sal = torch.zeros_like(image[:, 0])
    cols = [image[:, 0], sal, torch.sigmoid(logits[:1, 0].detach().float().cpu()), batch["label"][:1, 0].float()]
    if image.ndim == 5:
        cols = [c[..., c.shape[-1] // 2] for c in cols]
    return torch.cat([c.clamp(0, 1) for c in cols], dim=-1).numpy()


# --------------------------------------------------------------------------- one step


def forward_loss(model: nn.Module, batch: dict, loss_fn: Any, env: Env) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of a batch under autocast when AMP is on; the loss is computed in fp32."""
    x = batch["input"].to(env.device, non_blocking=True)
    y = batch["label"].to(env.device, non_blocking=True)
    with torch.autocast(env.device.type, dtype=env.amp_dtype or torch.float32, enabled=env.amp_dtype is not None):
        logits = model(x)
    return logits, loss_fn(logits.float(), y)


def backward_step(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, clip_grad: float = 0.0) -> None:
    """Backward pass and optimiser step (GradScaler for fp16; clipping on unscaled gradients)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


# --------------------------------------------------------------------------- main loop


def _head_sha256(cfg: TrainConfig, paths: DatasetPaths, cases: Sequence[str]) -> Optional[str]:
    """Provenance of the salience: the e2e initial head's hash, or the offline maps' generator weights."""
    from networks.salience import file_sha256

    if cfg.salience == "e2e":
        return file_sha256(cfg.head) if cfg.head else None
    if cfg.salience == "offline" and cases and paths.salience(cases[0]).is_file():
        import h5py

        with h5py.File(paths.salience(cases[0]), "r") as f:
            sha = f.attrs.get("weights_sha256", "")
        return str(sha) or None
    return None


def _write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says; returns where it wrote and how it ended (see module docstring)."""
    env = setup_env(cfg)
    try:
        return _train(cfg, env)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: Env) -> TrainResult:
    t_start = time.monotonic()
    seed_everything(cfg.seed, cfg.deterministic)
    dims = spatial_dims_of(cfg.backbone, **cfg.model_kwargs)  # unknown backbone -> ValueError
    paths = check_dataset(cfg)
    run_dir = cfg.run_dir()
    last_path, best_path = run_dir / "last.pth", run_dir / "best_model.pth"

    if cfg.resume and not last_path.is_file():
        raise FileNotFoundError(f"{last_path}: nothing to resume (no last.pth in the run folder)")
    if not cfg.resume and last_path.exists() and not cfg.overwrite:
        raise FileExistsError(f"{run_dir}: run folder already has checkpoints; pass --resume to continue "
                              f"or --overwrite to start again (or choose another --exp)")

    train_set = build_train_set(cfg, paths, dims)
    val_cases = VolumeDataSet(paths, "val", cfg.salience)
    sample = train_set[0]["input"]
    if sample.shape[0] != input_channels(cfg.salience) or sample.ndim - 1 != dims:
        raise ValueError(f"channel mismatch: data gives input {tuple(sample.shape)}, model {cfg.backbone} "
                         f"({dims}-D, salience {cfg.salience}) expects {input_channels(cfg.salience)} channels")

    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.backbone, cfg.salience, 1, cfg.model_kwargs, head_path=cfg.head).to(env.device)
    if cfg.init_from and not cfg.resume:
        src = init_from_checkpoint(model, cfg.init_from, model_name=cfg.backbone, salience=cfg.salience)
        log.info("weights from %s (%s, salience %s, epoch %s)", cfg.init_from, src["model_name"], src["salience"],
                 src.get("epoch"))
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.base_lr, cfg.weight_decay, cfg.momentum)
    per_epoch = batches_per_epoch(cfg, env, len(train_set))
    horizon = cfg.max_epochs * per_epoch
    if cfg.max_iterations:
        horizon = min(horizon, cfg.max_iterations)
    scheduler = poly_scheduler(optimizer, horizon, cfg.poly_power)
    scaler = torch.amp.GradScaler("cuda", enabled=env.amp_dtype == torch.float16)
    loss_fn = make_loss(cfg.loss, cfg.cldice_iterations)
    head_sha = _head_sha256(cfg, paths, val_cases.names)
    mm_per_pixel = train_set.mm_per_pixel() if isinstance(train_set, SliceDataSet) else None
    # the offline maps' generator, embedded in the checkpoint so predict.py needs no other file
    generator = find_offline_generator(paths.salience(val_cases.names[0]), [
        Path(cfg.output_root) / "salience" / cfg.dataset]) if cfg.salience == "offline" and val_cases.names else None

    start_epoch, iteration, best = 0, 0, -1.0
    if cfg.resume:
        ckpt = load_checkpoint(last_path, map_location="cpu")
        check_compatible(ckpt, last_path, backbone=cfg.backbone,
                         model_kwargs=resolve_kwargs(cfg.backbone, **cfg.model_kwargs), salience=cfg.salience)
        model.load_state_dict(ckpt["state_dict"])
        if ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, iteration, best = int(ckpt["epoch"]), int(ckpt["iteration"]), float(ckpt["best_metric"])

    writer = None
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and not cfg.resume:
            # a fresh start must not leave the previous run's best model looking like this run's
            for old in (last_path, best_path):
                old.unlink(missing_ok=True)
        setup_logging(log_file=run_dir / "train.log")
        _write_json(run_dir / "config.json", {**cfg.to_json(), "device": str(env.device),
                                              "world_size": env.world_size, "torch": torch.__version__,
                                              "amp_dtype": str(env.amp_dtype), "iterations_per_epoch": per_epoch,
                                              "lr_horizon_iterations": horizon})
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
        log.info("run folder %s; %s %d-D, salience %s, %d training items, %d val cases, device %s, %s, amp %s",
                 run_dir, cfg.backbone, dims, cfg.salience, len(train_set), len(val_cases), env.device,
                 f"DDP x{env.world_size} ({dist.get_backend()})" if env.distributed else "single process",
                 env.amp_dtype)
        if cfg.resume:
            log.info("resumed from %s at epoch %d, iteration %d (best val Dice %.4f)", last_path, start_epoch,
                     iteration, best)

    if env.distributed:
        ddp_kw = {"device_ids": [env.local_rank]} if env.device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kw)

    def checkpoint(path: Path, epoch_done: int) -> None:
        save_checkpoint(path, model, model_name=cfg.backbone, model_kwargs=cfg.model_kwargs,
                        salience=cfg.salience, config=cfg.to_json(), epoch=epoch_done, iteration=iteration,
                        best_metric=best, head_sha256=head_sha, img_size=cfg.img_size, patch_size=cfg.patch_size,
                        target_spacing=cfg.target_spacing, mm_per_pixel=mm_per_pixel,
                        optimizer=optimizer, scheduler=scheduler, scaler=scaler if scaler.is_enabled() else None,
                        generator=generator)

    def run_validation(epoch_done: int, last_batch: Optional[dict], last_logits: Optional[torch.Tensor]) -> None:
        nonlocal best
        if env.main:
            metrics = validate(model, val_cases, cfg, env, dims)
            writer.add_scalar("val/dice", metrics["dice"], iteration)
            writer.add_scalar("val/cldice", metrics["cldice"], iteration)
            if last_batch is not None:
                writer.add_image("train/image_salience_pred_label",
                                 image_grid(model, last_batch, last_logits, cfg.salience), iteration,
                                 dataformats="CHW")
            improved = metrics["dice"] > best
            if improved:
                best = metrics["dice"]
                checkpoint(best_path, epoch_done)
            log.info("iteration %d: val Dice %.4f clDice %.4f (best %.4f%s)", iteration, metrics["dice"],
                     metrics["cldice"], best, ", saved best_model.pth" if improved else "")
        if env.distributed:
            # every rank keeps the same best metric (written into its result and checkpoints)
            t = torch.tensor([best], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
            dist.broadcast(t, 0)
            best = float(t.item())

    losses: list[float] = []
    stopped_by = "max_epochs"
    epoch = start_epoch
    validated_at = -1
    epochs_this_run = 0
    deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes is not None else None
    batch, logits = None, None
    while epoch < cfg.max_epochs:
        skip_batches = max(0, iteration - epoch * per_epoch)
        loader = make_loader(cfg, env, train_set, epoch, skip_batches * cfg.batch_size)
        torch.manual_seed(cfg.seed + 7919 * epoch + skip_batches)
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.max_epochs}", disable=not env.main, leave=False,
                   dynamic_ncols=True)
        stop = None
        for batch in bar:
            logits, loss = forward_loss(model, batch, loss_fn, env)
            loss_value = loss.detach()
            if env.distributed:
                dist.all_reduce(loss_value)
                loss_value /= env.world_size
            loss_value = float(loss_value)
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss is {loss_value} at iteration {iteration + 1} (epoch {epoch + 1}); stopped, "
                    f"last good checkpoint kept at {last_path if last_path.exists() else '(none yet)'}")
            backward_step(model, loss, optimizer, scaler, cfg.clip_grad)
            scheduler.step()
            iteration += 1
            losses.append(loss_value)
            if env.main:
                lr = optimizer.param_groups[0]["lr"]
                writer.add_scalar("train/loss", loss_value, iteration)
                writer.add_scalar("train/lr", lr, iteration)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if cfg.val_every and iteration % cfg.val_every == 0:
                run_validation(epoch, batch, logits)
                validated_at = iteration
                if env.main:
                    checkpoint(last_path, epoch)
            if cfg.max_iterations and iteration >= cfg.max_iterations:
                stop = "max_iterations"
            elif deadline is not None and _agreed(time.monotonic() > deadline, env):
                stop = "max_minutes"
            if stop:
                break
        bar.close()
        if stop is None:
            epoch += 1
            epochs_this_run += 1
            if env.main:
                log.info("epoch %d/%d done, iteration %d, mean loss %.4f", epoch, cfg.max_epochs, iteration,
                         float(np.mean(losses[-per_epoch:])) if losses else float("nan"))
        if (stop or not cfg.val_every) and validated_at != iteration:
            run_validation(epoch, batch, logits)
            validated_at = iteration
        if env.main:
            checkpoint(last_path, epoch)
        if stop is None and cfg.stop_after_epochs and epochs_this_run >= cfg.stop_after_epochs \
                and epoch < cfg.max_epochs:
            stop = "stop_after_epochs"
        if stop:
            stopped_by = stop
            break
    if env.main:
        writer.close()
        log.info("finished (%s) after %d iterations; best val Dice %.4f; checkpoints in %s", stopped_by,
                 iteration, best, run_dir)
    return TrainResult(env.main, run_dir, epoch, iteration, best, losses, stopped_by)


def _agreed(flag: bool, env: Env) -> bool:
    """All ranks stop together: the time budget is rank 0's clock."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.broadcast(t, 0)
    return bool(t.item())
