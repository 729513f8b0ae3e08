"""Training loop behind main.py: one code path for CPU, one GPU and DDP under torchrun.

``train(cfg)`` builds the model (networks.e2e.build_segmenter), the data
(2-D: dataloaders.datasets.SliceDataSet on ``slice_train``; 3-D: PatchDataSet over
``vol_train``), loss, optimiser and the seed's poly schedule, and trains. ``_train`` reads
as its steps: :func:`_setup`, then per batch :func:`_train_step`, :func:`_validate` at
the chosen cadence and :func:`_save`.

- One DataLoader for the whole run (persistent workers, ``prefetch_factor``, pinned
  memory and non-blocking copies on CUDA). Its batch sampler (:class:`RunBatchSampler`)
  yields ``(epoch, index)`` keys for every remaining epoch, so the epoch reaches the
  workers with the indices: augmentation depends on (seed, epoch, index) only and a run
  resumed mid-epoch sees exactly the batches the interrupted run had not seen.
- No host-device sync per step: losses stay on the device and are checked for NaN/inf,
  all-reduced (DDP) and logged every ``log_every`` iterations (and before every
  validation or checkpoint, so a diverged model is never saved).
- AMP on CUDA: bf16 where the GPU has bf16 kernels (:func:`cuda_amp_dtype`), else fp16 with a
  GradScaler; fp32 on CPU.
  ``cudnn.benchmark`` is on unless ``deterministic`` (opt-in); ``channels_last`` optional.
- DDP when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on the CPU; rank 0
  alone logs and writes files.
- Validation on ``vol_val`` with inference.predictor.Predictor and evaluation.metrics (Dice,
  clDice of the masks of inference.vessel_mask: probabilities >= 0.5, components under
  ``min_component_mm3`` dropped; mean over cases; label skeletons computed once); under DDP each rank predicts its share of the cases and the sums are
  all-reduced. Cadence: every ``val_every`` iterations, or (``val_every`` 0) at epoch ends,
  skipping those that would make validation more than ``val_fraction`` of the wall time;
  always at the end of the run. ``best_model.pth`` keeps the best validation Dice (the
  seed's rule); ``last.pth`` (the latest state) is written after each validation, every
  ``save_minutes`` at an epoch end and when the run stops; both are contract-1 checkpoints
  written atomically. ``resume`` continues from ``last.pth`` exactly (same weights as an
  uninterrupted run on the CPU).
- Run folder ``<output_root>/<dataset>/<backbone>/epo<E>_bs<B>_lr<L>/<exp>`` with
  config.json, train.log, TensorBoard events (train/loss, train/lr, val/dice,
  val/cldice, an image grid: image | salience | prediction | label).
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import shutil
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
from inference.predictor import Predictor
from losses import make_loss, make_optimizer, poly_scheduler
from networks.checkpoint import (
    check_backbone_source,
    check_compatible,
    generator_record,
    init_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unwrap,
)
from networks.e2e import E2ESegmenter, build_segmenter
from networks.registry import resolve_kwargs, spatial_dims_of
from train_config import RESUMABLE_OPTIONS, TrainConfig
from utils import manifests
from utils.atomic import atomic_path
from utils.h5io import HU_WINDOW, DatasetPaths, read_list
from utils.provenance import file_sha256
from utils.logging_setup import setup_logging

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]

log = logging.getLogger("trainer")


class TrainingError(RuntimeError):
    """A training run cannot go on (NaN loss, ...); the message is one line for the user."""


@dataclass
class TrainResult:
    """How a run ended; ``main`` is True on the process that wrote the files (rank 0).

    ``model`` is the trained network (unwrapped from DDP). ``flush_times`` holds
    (iteration, wall seconds since the start of ``train``, CPU seconds of this process) at
    each loss check, taken after the device had finished that iteration: throughput
    between two of them is exact.
    """

    main: bool
    run_dir: Path
    epoch: int
    iteration: int
    best_metric: float
    losses: list[float]
    stopped_by: str
    model: Optional[nn.Module] = None
    flush_times: list[tuple[int, float, float]] = field(default_factory=list)
    validation_seconds: float = 0.0


# --------------------------------------------------------------------------- environment


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    amp_dtype: Optional[torch.dtype] = None  # None: fp32
    distributed: bool = False  # launched by torchrun (DDP, even with one process)
    memory_format: torch.memory_format = torch.contiguous_format

    @property
    def main(self) -> bool:
        return self.rank == 0


def cuda_amp_dtype() -> torch.dtype:
    """The autocast dtype on this process's CUDA device: bf16 where it has bf16 kernels (Ampere and
    later), else fp16 (with a gradient scaler in training). From torch 2.4 ``is_bf16_supported``
    counts emulation by default, and a T4 or V100 can hold bf16 tensors without bf16 kernels, so
    emulation is asked not to count; earlier torch has no such argument and never counted it."""
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        native = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else torch.float16


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
        # the first collective waits for every rank's data cache and first validation
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    amp_dtype = None
    if use_cuda and cfg.amp:
        amp_dtype = cuda_amp_dtype()
    return Env(device, rank, local, world, amp_dtype, distributed)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed every generator; ``deterministic`` trades cudnn.benchmark for reproducible GPU kernels."""
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
        torch.backends.cudnn.deterministic = False
        torch.use_deterministic_algorithms(False)


# --------------------------------------------------------------------------- data


class RunBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for epochs ``start_epoch`` .. ``end_epoch`` - 1.

    Each epoch's order is fixed by (seed, epoch): without DDP a RandomSampler seeded with
    ``seed * 1000 + epoch``; with DDP the DistributedSampler's shard of this rank. The first
    ``skip_batches`` batches of ``start_epoch`` are left out (a run resumed mid-epoch).
    Batches never straddle epochs; the last one of an epoch may be short.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, start_epoch: int, end_epoch: int,
                 skip_batches: int = 0, rank: int = 0, world_size: int = 1, distributed: bool = False) -> None:
        self.n_items, self.batch_size, self.seed = int(n_items), int(batch_size), int(seed)
        self.start_epoch, self.end_epoch, self.skip_batches = int(start_epoch), int(end_epoch), int(skip_batches)
        self.rank, self.world_size, self.distributed = rank, world_size, distributed

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's item indices of ``epoch``, in order."""
        if self.distributed:
            sampler: Sampler[int] = DistributedSampler(range(self.n_items), num_replicas=self.world_size,
                                                       rank=self.rank, shuffle=True, seed=self.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(range(self.n_items),
                                    generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return list(sampler)

    def batches_per_epoch(self) -> int:
        per_rank = math.ceil(self.n_items / self.world_size) if self.distributed else self.n_items
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in range(self.start_epoch, self.end_epoch):
            order = self.epoch_order(epoch)
            first = self.skip_batches if epoch == self.start_epoch else 0
            for b in range(first, self.batches_per_epoch()):
                yield [(epoch, i) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]

    def __len__(self) -> int:
        return max(0, (self.end_epoch - self.start_epoch) * self.batches_per_epoch() - self.skip_batches)


def check_dataset(cfg: TrainConfig) -> DatasetPaths:
    """The dataset's folders; FileNotFoundError naming the one that is missing."""
    paths = DatasetPaths.of(cfg.root_path, cfg.dataset, cfg.list_dir)
    if not paths.root.is_dir():
        raise FileNotFoundError(f"{paths.root}: dataset folder not found (unknown --dataset {cfg.dataset!r}? "
                                f"run preprocess.py --dataset {cfg.dataset} first)")
    if not paths.list_dir.is_dir():
        raise FileNotFoundError(f"{paths.list_dir}: list folder for dataset {cfg.dataset!r} not found")
    return paths


def build_train_set(cfg: TrainConfig, paths: DatasetPaths, dims: int,
                    class_values: Optional[Sequence[int]] = None) -> torch.utils.data.Dataset:
    """2-D: the training slices (``slice_train``); 3-D: random patches of the training volumes.
    ``class_values``: the class-map values of ``cfg.classes`` (one target channel each)."""
    if dims == 2:
        return SliceDataSet(paths, cfg.salience, img_size=cfg.img_size, augment=cfg.augment,
                            jitter=cfg.intensity_jitter, seed=cfg.seed, target_spacing=cfg.target_spacing,
                            cache=cfg.cache_data, domain=cfg.domain_aug, scale_aug=cfg.scale_aug,
                            rotate_aug=cfg.rotate_aug, elastic_aug=cfg.elastic_aug, bias_aug=cfg.bias_aug,
                            blur_aug=cfg.blur_aug, classes=class_values, context=cfg.context_slices)
    if cfg.context_slices:
        raise ValueError(f"--context_slices is for 2-D backbones; {cfg.backbone} sees the neighbouring slices already")
    if cfg.scale_aug or cfg.rotate_aug or cfg.elastic_aug or cfg.bias_aug:
        raise ValueError(f"--scale_aug, --rotate_aug, --elastic_aug and --bias_aug are for 2-D backbones; "
                         f"{cfg.backbone} trains on 3-D patches")
    if cfg.target_spacing is not None:
        # a 3-D model trains and predicts on the stored grid: the millimetres would be silently ignored
        raise ValueError(f"--target_spacing is for 2-D backbones; {cfg.backbone} trains on 3-D patches of the "
                         f"stored grid")
    # volumes are always held in memory
    volumes = VolumeDataSet(paths, "train", cfg.salience, classes=class_values is not None)
    return PatchDataSet(volumes, cfg.patch_size, cfg.patches_per_epoch, fg_fraction=cfg.fg_fraction,
                        augment=cfg.augment, jitter=cfg.intensity_jitter, seed=cfg.seed, domain=cfg.domain_aug,
                        blur_aug=cfg.blur_aug, classes=class_values)


def make_loader(cfg: TrainConfig, env: Env, dataset: Any, start_epoch: int, skip_batches: int) -> DataLoader:
    """The run's one loader: every remaining batch from ``start_epoch`` (less ``skip_batches``)."""
    sampler = RunBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start_epoch, cfg.max_epochs, skip_batches,
                              env.rank, env.world_size, env.distributed)
    workers = cfg.num_workers
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=env.device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=cfg.prefetch_factor if workers > 0 else None)


def batches_per_epoch(cfg: TrainConfig, env: Env, n_items: int) -> int:
    """Optimiser steps in one epoch of ``n_items`` on this rank."""
    return RunBatchSampler(n_items, cfg.batch_size, 0, 0, 1, 0, env.rank, env.world_size,
                           env.distributed).batches_per_epoch()


# --------------------------------------------------------------------------- validation


class Validator:
    """Mean Dice and clDice over the validation cases, predicted as test.py and predict.py do
    (:class:`inference.predictor.Predictor` around the model being trained).

    With classes (``class_values``, the class-map values of ``cfg.classes``; the cases' labels are
    then class maps): "dice" is the mean over classes of each class's Dice (the label map of
    :meth:`Predictor.labels` against the class map), clDice that of the union.

    Under DDP rank r predicts cases r, r + world, ...; the sums and counts of the defined
    (non-NaN) per-case values are all-reduced, so every rank returns the same means. The
    label skeletons (clDice) are computed once, on first use.
    """

    def __init__(self, cases: VolumeDataSet, cfg: TrainConfig, env: Env, dims: int,
                 class_values: Optional[Sequence[int]] = None) -> None:
        self.cases, self.cfg, self.env, self.dims = cases, cfg, env, dims
        self.class_values = None if class_values is None else list(class_values)
        self.mine = list(range(env.rank, len(cases), env.world_size)) if env.distributed else list(range(len(cases)))
        self._skeletons: dict[int, np.ndarray] = {}

    def label_skeleton(self, i: int) -> np.ndarray:
        from evaluation.metrics import skeleton

        if i not in self._skeletons:
            self._skeletons[i] = skeleton(self.cases[i].label > 0)
        return self._skeletons[i]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        # scipy / skimage (about 1 s to import): not before the first training step
        from evaluation.metrics import cldice as cldice_metric
        from evaluation.metrics import dice as dice_metric

        cfg, env, dims = self.cfg, self.env, self.dims
        model = unwrap(model)
        sums = np.zeros(4)  # dice sum, dice count, clDice sum, clDice count
        predictor = Predictor.for_training(model, cfg, dims, env.device)
        for i in self.mine:
            case = self.cases[i]
            with torch.autocast(env.device.type, dtype=env.amp_dtype or torch.float32,
                                enabled=env.amp_dtype is not None):
                prob = predictor.probabilities(case.image, case.spacing, case.salience, overlap=cfg.val_overlap,
                                               batch_size=cfg.val_batch_size)
            if self.class_values is None:
                pred = predictor.mask(prob, case.spacing)
                score = dice_metric(pred, case.label)
            else:
                labels = predictor.labels(prob, case.spacing)
                pred = labels > 0
                per_class = [dice_metric(labels == k + 1, case.label == v) for k, v in enumerate(self.class_values)]
                score = float(np.nanmean(per_class)) if not all(map(math.isnan, per_class)) else math.nan
            # cases with an empty truth and prediction give NaN; they carry no information
            for k, value in enumerate((score,
                                       cldice_metric(pred, case.label > 0, target_skeleton=self.label_skeleton(i)))):
                if not math.isnan(value):
                    sums[2 * k] += value
                    sums[2 * k + 1] += 1
        if env.distributed:
            t = torch.tensor(sums, dtype=torch.float64, device=env.device)
            dist.all_reduce(t)
            sums = t.cpu().numpy()
        return {"dice": float(sums[0] / sums[1]) if sums[1] else 0.0,
                "cldice": float(sums[2] / sums[3]) if sums[3] else 0.0}


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
    # several classes: the largest probability, and the union of the labels
    cols = [image[:, 0], sal, torch.sigmoid(logits[:1].detach().float().cpu()).amax(dim=1),
            batch["label"][:1].float().amax(dim=1)]
    if image.ndim == 5:
        cols = [c[..., c.shape[-1] // 2] for c in cols]
    return torch.cat([c.clamp(0, 1) for c in cols], dim=-1).numpy()


# --------------------------------------------------------------------------- one step


def forward_loss(model: nn.Module, batch: dict, loss_fn: Any, env: Env) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of a batch under autocast when AMP is on; the loss is computed in fp32."""
    x = batch["input"].to(env.device, non_blocking=True, memory_format=env.memory_format)
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


class LossMonitor:
    """Losses kept on the device; every ``flush`` checks them (one host sync) and logs them.

    Under DDP the flushed losses are all-reduced (mean over ranks), so every rank logs and
    returns the same values and stops at the same non-finite loss.
    """

    def __init__(self, env: Env, writer: Any, last_path: Path, start: float) -> None:
        self.env, self.writer, self.last_path, self.start = env, writer, last_path, start
        self.pending: list[tuple[int, int, float, torch.Tensor]] = []  # iteration, epoch, lr, loss
        self.losses: list[float] = []
        self.flush_times: list[tuple[int, float, float]] = []

    def add(self, iteration: int, epoch: int, lr: float, loss: torch.Tensor) -> None:
        self.pending.append((iteration, epoch, lr, loss.detach()))

    def flush(self) -> Optional[float]:
        """Check and log the pending losses; return the last one (None if there were none)."""
        if not self.pending:
            return None
        values = torch.stack([p[3].float() for p in self.pending])
        if self.env.distributed:
            dist.all_reduce(values)
            values /= self.env.world_size
        values_host = values.cpu().tolist()
        self.flush_times.append((self.pending[-1][0], time.monotonic() - self.start, time.process_time()))
        for (iteration, epoch, lr, _), value in zip(self.pending, values_host):
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at iteration {iteration} (epoch {epoch + 1}); stopped, last good checkpoint "
                    f"kept at {self.last_path if self.last_path.exists() else '(none yet)'}")
            if self.writer is not None:
                self.writer.add_scalar("train/loss", value, iteration)
                self.writer.add_scalar("train/lr", lr, iteration)
        self.losses.extend(values_host)
        self.pending = []
        return values_host[-1]


# --------------------------------------------------------------------------- run state


def _write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


@dataclass
class _Run:
    """Everything a run holds between steps (built by :func:`_setup`)."""

    cfg: TrainConfig
    env: Env
    dims: int
    run_dir: Path
    train_set: Any
    validator: Validator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: Any
    head_sha: Optional[str]
    per_epoch: int
    monitor: LossMonitor
    mm_per_pixel: Optional[float] = None  # what the 2-D model sees (checkpoints record it for test.py)
    generator: Optional[dict] = None  # offline maps' generator, embedded in checkpoints (predict.py)
    stage: StageManifests = field(default_factory=lambda: StageManifests(None, None))
    #: warnings found while setting up, said once train.log is open (rank 0)
    notes: list[str] = field(default_factory=list)
    writer: Any = None
    epoch: int = 0
    iteration: int = 0
    best: float = -1.0
    t_start: float = 0.0
    validated_at: int = -1
    val_seconds: float = 0.0  # all validations of this run
    last_val_seconds: Optional[float] = None
    trained_since_val: float = 0.0  # seconds of training since the last validation
    saved_at: float = 0.0
    complete: bool = False  # resumed a run that had already finished: nothing to do

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pth"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best_model.pth"


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says; returns where it wrote and how it ended (see module docstring)."""
    env = setup_env(cfg)
    try:
        return _train(cfg, env)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _check_run_folder(cfg: TrainConfig) -> None:
    last_path = cfg.run_dir() / "last.pth"
    if cfg.resume and not last_path.is_file():
        raise FileNotFoundError(f"{last_path}: nothing to resume (no last.pth in the run folder)")
    if not cfg.resume and last_path.exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.run_dir()}: run folder already has checkpoints; pass --resume to continue "
                              f"or --overwrite to start again (or choose another --exp)")


@dataclass
class StageManifests:
    """The data's manifests (utils.manifests), read once and checked against each other."""

    dataset: Optional[dict]
    salience: Optional[dict]

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "salience": self.salience}


def read_stage_manifests(cfg: TrainConfig, paths: DatasetPaths, cases: Sequence[str]) -> StageManifests:
    """dataset.json and (offline salience) the maps' manifest, checked to agree with each other, with
    the code's HU window and with ``cases``; ValueError (one line naming the field) when they do not.
    Data made before manifests existed trains with a warning."""
    docs = manifests.read_stage(paths, with_salience=cfg.salience == "offline")
    dataset, salience = docs["dataset"], docs.get("salience")
    if dataset is None:
        log.warning("%s: no dataset manifest (data made before preprocess.py wrote one): its options cannot be "
                    "checked; run preprocess.py again to record them", manifests.dataset_manifest_path(paths))
    if cfg.salience == "offline" and salience is None:
        log.warning("%s: no manifest of the salience maps (made before salience_generation.py wrote one): the "
                    "checkpoint will not embed their generator (predict.py then needs --head FILE)",
                    manifests.salience_manifest_path(paths))
    manifests.check_agreement(paths, dataset, salience, cases, HU_WINDOW)
    return StageManifests(dataset, salience)


def offline_generator(salience_manifest: Optional[dict]) -> Optional[dict]:
    """The generator that made the offline maps, as embedded in checkpoints (predict.py needs no
    other file), from the maps' manifest: its weights file, checked against the recorded sha256."""
    if salience_manifest is None:
        return None
    gen, rule = salience_manifest["generator"], salience_manifest.get("normalisation", "volume")
    if gen["kind"] == "analytic":
        return generator_record("analytic", normalisation=rule)
    where = gen.get("weights_path")
    if not where or not Path(where).is_file():
        log.warning("%s: the weights the salience maps were made with are gone: the checkpoint will not embed their "
                    "generator (predict.py then needs --head FILE)", where)
        return None
    if file_sha256(where) != gen["weights_sha256"]:
        raise ValueError(f"{where}: weights changed since the salience maps were made from them (sha256 "
                         f"{gen['weights_sha256'][:12]}...); run salience_generation.py again")
    return generator_record(gen["kind"], where, rule)


def salience_sha256(cfg: TrainConfig, stage: StageManifests) -> Optional[str]:
    """Provenance of the salience: the e2e initial head's hash, or the offline maps' generator weights."""
    if cfg.salience == "e2e":
        return file_sha256(cfg.head) if cfg.head else None
    if cfg.salience == "offline" and stage.salience is not None:
        return stage.salience["generator"]["weights_sha256"] or None
    return None


def lr_horizon(cfg: TrainConfig, per_epoch: int) -> int:
    """Iterations the poly schedule decays over: all epochs' batches, or ``max_iterations`` if fewer."""
    horizon = cfg.max_epochs * per_epoch
    return min(horizon, cfg.max_iterations) if cfg.max_iterations else horizon


def is_complete(cfg: TrainConfig, epoch: int, iteration: int) -> bool:
    """A run at (``epoch``, ``iteration``) has nothing left to train under ``cfg``."""
    return epoch >= cfg.max_epochs or bool(cfg.max_iterations and iteration >= cfg.max_iterations)


def _resume(run: _Run) -> Optional[str]:
    """Load model, optimiser, schedule and counters from ``last.pth``, or refuse in one line;
    returns what the log must say about the resumed schedule, or None (said once train.log is open,
    by rank 0 only).

    Only where the run stops may change (``RESUMABLE_OPTIONS``). Another world size is
    refused: the sampler's shards and the iterations per epoch depend on it, so the batches
    left to see would be the wrong ones. Another ``max_iterations`` moves the poly schedule's
    horizon: the learning rate from here on follows the new horizon, and the log says so.
    """
    cfg = run.cfg
    ckpt = load_checkpoint(run.last_path, map_location="cpu")
    check_backbone_source(ckpt, run.last_path)  # the plug-in gone: refused; edited since: a warning
    check_compatible(ckpt, run.last_path, backbone=cfg.backbone,
                     model_kwargs=resolve_kwargs(cfg.backbone, **cfg.model_kwargs), salience=cfg.salience)
    saved = ckpt.get("config") or {}
    # a run resumed with another learning rate, loss or augmentation would be neither run
    diffs = cfg.differences(saved, ignore=RESUMABLE_OPTIONS)
    if diffs:
        raise ValueError(f"{run.last_path}: cannot resume with other options ({'; '.join(diffs)}); resume with the "
                         f"run's options (only where it stops may change) or start again with --overwrite")
    for key, why in manifests.changes(ckpt.get("manifests") or {}, run.stage.as_dict()).items():
        if why == "changed":
            raise ValueError(f"{run.last_path}: the {key} manifest changed since the run started (the data was made "
                             f"again); start again with --overwrite")
    world = int(saved.get("world_size", 1))
    if world != run.env.world_size:
        raise ValueError(f"{run.last_path}: trained on {world} process(es), resumed on {run.env.world_size}: the "
                         f"batches left to see depend on it; resume with torchrun --nproc_per_node {world}"
                         f"{'' if world > 1 else ' (or without torchrun)'}")
    run.model.load_state_dict(ckpt["state_dict"])
    if ckpt.get("optimizer"):
        run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scheduler"):
        run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.iteration, run.best = int(ckpt["epoch"]), int(ckpt["iteration"]), float(ckpt["best_metric"])
    # a checkpoint written at an epoch's last batch (a validation or a stop there) names that epoch:
    # it is done, and resuming must not run it again with no batches left
    run.epoch = max(run.epoch, run.iteration // run.per_epoch)
    old = int(saved.get("lr_horizon_iterations") or 0)
    new = lr_horizon(cfg, run.per_epoch)
    if old and old != new and not is_complete(cfg, run.epoch, run.iteration):
        # LambdaLR keeps its counter but not its function: set this iteration's rate by the new horizon
        factor = max(0.0, 1.0 - run.iteration / new) ** cfg.poly_power
        for group in run.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return (f"{run.last_path}: the poly schedule's horizon changes from {old} to {new} iterations "
                f"(max_iterations {saved.get('max_iterations')} -> {cfg.max_iterations}): learning rate "
                f"{cfg.base_lr * factor:.3g} at iteration {run.iteration}, decaying to 0 at {new}")
    return None


def _remove_previous_run(run_dir: Path) -> None:
    """A fresh start (``--overwrite``) must not leave the previous run's models, reports
    (test.py's ``eval_*`` folders) or TensorBoard curves looking like this run's."""
    removed = []
    for old in (run_dir / "last.pth", run_dir / "best_model.pth"):
        if old.is_file():
            old.unlink()
            removed.append(old.name)
    for old in sorted(run_dir.glob("eval_*")) + [run_dir / "tensorboard"]:
        if old.is_dir():
            shutil.rmtree(old)
            removed.append(old.name + "/")
    if removed:
        log.info("--overwrite: removed the previous run's %s from %s", ", ".join(removed), run_dir)


def _start_logging(run: _Run, horizon: int, n_val: int) -> None:
    """Rank 0: run folder, train.log, config.json and the TensorBoard writer."""
    cfg, env = run.cfg, run.env
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        _remove_previous_run(run.run_dir)
    setup_logging(log_file=run.run_dir / "train.log")
    _write_json(run.run_dir / "config.json", {**cfg.to_json(), "device": str(env.device),
                                              "world_size": env.world_size, "torch": torch.__version__,
                                              "amp_dtype": str(env.amp_dtype), "iterations_per_epoch": run.per_epoch,
                                              "lr_horizon_iterations": horizon})
    for name, doc in (("dataset.json", run.stage.dataset), ("salience_manifest.json", run.stage.salience)):
        if doc is not None:
            _write_json(run.run_dir / name, doc)
        else:
            (run.run_dir / name).unlink(missing_ok=True)
    from tensorboardX import SummaryWriter

    run.writer = run.monitor.writer = SummaryWriter(str(run.run_dir / "tensorboard"))
    for note in run.notes:
        log.warning("%s", note)
    log.info("run folder %s; %s %d-D, salience %s, %d training items, %d val cases, device %s, %s, amp %s",
             run.run_dir, cfg.backbone, run.dims, cfg.salience, len(run.train_set), n_val, env.device,
             f"DDP x{env.world_size} ({dist.get_backend()})" if env.distributed else "single process", env.amp_dtype)
    if cfg.resume:
        log.info("resumed from %s at epoch %d, iteration %d (best val Dice %.4f)", run.last_path, run.epoch,
                 run.iteration, run.best)


def _setup(cfg: TrainConfig, env: Env, t_start: float) -> _Run:
    """Data, model, optimiser, schedule, resume state and (rank 0) the run folder."""
    seed_everything(cfg.seed, cfg.deterministic)
    dims = spatial_dims_of(cfg.backbone, **cfg.model_kwargs)  # unknown backbone -> ValueError
    paths = check_dataset(cfg)
    _check_run_folder(cfg)
    stage = read_stage_manifests(cfg, paths, read_list(paths.list_file("vol_train")) +
                                 read_list(paths.list_file("vol_val")))
    class_values = None
    if cfg.classes:
        class_values = manifests.class_values(cfg.classes, stage.dataset, manifests.dataset_manifest_path(paths))
    train_set = build_train_set(cfg, paths, dims, class_values)
    # read at the first validation
    val_cases = VolumeDataSet(paths, "val", cfg.salience, lazy=True, classes=class_values is not None)
    sample = train_set[0]["input"]
    channels = input_channels(cfg.salience, cfg.context_slices)
    if sample.shape[0] != channels or sample.ndim - 1 != dims:
        raise ValueError(f"channel mismatch: data gives input {tuple(sample.shape)}, model {cfg.backbone} "
                         f"({dims}-D, salience {cfg.salience}, {cfg.context_slices} context slices) expects "
                         f"{channels} channels")
    if cfg.channels_last:
        env.memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d

    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.backbone, cfg.salience, len(cfg.classes) if cfg.classes else 1, cfg.model_kwargs,
                            head_path=cfg.head, context=cfg.context_slices)
    model = model.to(env.device, memory_format=env.memory_format)
    head_from_init = False
    if cfg.init_from and not cfg.resume:
        src = init_from_checkpoint(model, cfg.init_from, model_name=cfg.backbone, salience=cfg.salience,
                                   context=cfg.context_slices)
        if cfg.head and cfg.salience == "e2e" and src["salience"] == "e2e":
            # the run would record --head's hash as its salience provenance and train another head
            raise ValueError(f"--head {cfg.head}: the salience head comes from --init_from {cfg.init_from} (an e2e "
                             f"run) and replaces it; give --head or an e2e --init_from, not both")
        log.info("weights from %s (%s, salience %s, epoch %s)", cfg.init_from, src["model_name"], src["salience"],
                 src.get("epoch"))
        head_from_init = cfg.salience == "e2e" and src["salience"] == "e2e"  # the head is copied then
    if cfg.freeze_bn and freeze_norm_statistics(model) == 0:
        raise ValueError(f"--freeze_bn: backbone {cfg.backbone} has no BatchNorm layer whose statistics could be kept")
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.base_lr, cfg.weight_decay, cfg.momentum)
    per_epoch = batches_per_epoch(cfg, env, len(train_set))
    horizon = lr_horizon(cfg, per_epoch)
    run_dir = cfg.run_dir()
    run = _Run(cfg, env, dims, run_dir, train_set, Validator(val_cases, cfg, env, dims, class_values), model, optimizer,
               poly_scheduler(optimizer, horizon, cfg.poly_power),
               torch.amp.GradScaler("cuda", enabled=env.amp_dtype == torch.float16),
               make_loss(cfg.loss, cfg.cldice_iterations), salience_sha256(cfg, stage), per_epoch,
               LossMonitor(env, None, run_dir / "last.pth", t_start), t_start=t_start, saved_at=time.monotonic(),
               mm_per_pixel=train_set.mm_per_pixel() if isinstance(train_set, SliceDataSet) else None,
               generator=offline_generator(stage.salience), stage=stage)
    if cfg.max_iterations and horizon < cfg.max_iterations:
        # the loop ends at max_epochs: say so at the start (and in train.log), not in the last line of a long run
        run.notes.append(f"--max_epochs {cfg.max_epochs} x {per_epoch} iterations per epoch stops this run at "
                         f"{horizon} iterations, before --max_iterations {cfg.max_iterations}: raise --max_epochs "
                         f"to train them all")
    if cfg.salience == "e2e" and not cfg.head and not head_from_init and not cfg.resume:
        # allowed (the e2e mode learns the head too), but easy to get by mistake
        run.notes.append("--salience e2e without --head: the salience head starts untrained (give --head with a "
                         "fitted head, e.g. salience_generation.py --fit's, to start from it)")
    if cfg.resume:
        note = _resume(run)
        if is_complete(cfg, run.epoch, run.iteration):
            run.complete = True
            return run  # nothing to train: no logs, no files touched
        if note:
            run.notes.append(note)
    if env.main:
        _start_logging(run, horizon, len(val_cases))
    if env.distributed:
        ddp_kw = {"device_ids": [env.local_rank]} if env.device.type == "cuda" else {}
        run.model = nn.parallel.DistributedDataParallel(run.model, **ddp_kw)
    return run


# --------------------------------------------------------------------------- steps


def freeze_norm_statistics(model: nn.Module) -> int:
    """Put every BatchNorm of ``model`` in eval mode; returns how many there are.

    In eval mode a BatchNorm normalises with its running statistics and no longer updates
    them, while its affine weight and bias still get gradients. Fine-tuning on one patient
    (``--freeze_bn``) keeps the statistics the starting weights were trained with: four
    slices of one scan per batch are a poor estimate, and 150 steps at momentum 0.1
    replace the old statistics whatever the learning rate. ``model.train()`` undoes this,
    so the trainer calls it after each ``model.train()`` (validation's
    ``inference.predict_volume`` hands back every submodule in the mode it found it).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    return len(norms)


def _train_step(run: _Run, batch: dict) -> torch.Tensor:
    """One optimiser step on ``batch``; returns the logits (the loss goes to the monitor)."""
    logits, loss = forward_loss(run.model, batch, run.loss_fn, run.env)
    lr = run.optimizer.param_groups[0]["lr"]
    backward_step(run.model, loss, run.optimizer, run.scaler, run.cfg.clip_grad)
    run.scheduler.step()
    run.iteration += 1
    run.monitor.add(run.iteration, run.epoch, lr, loss)
    return logits


def _sync_buffers(run: _Run) -> None:
    """DDP: every rank takes rank 0's buffers (BatchNorm running statistics).

    DDP averages gradients, so parameters agree, but each rank's last forward pass updated
    its own running statistics (DDP broadcasts them only before the next forward).
    """
    if run.env.distributed:
        for buf in unwrap(run.model).buffers():
            dist.broadcast(buf, 0)


def _validate(run: _Run, epoch_done: int, batch: Optional[dict], logits: Optional[torch.Tensor]) -> None:
    """Validate (every rank its share), log, keep the best model and write ``last.pth``."""
    run.monitor.flush()  # never judge or save a model whose loss went NaN
    _sync_buffers(run)  # the ranks validate one and the same model
    t0 = time.monotonic()
    metrics = run.validator(run.model)
    if run.env.main:
        run.writer.add_scalar("val/dice", metrics["dice"], run.iteration)
        run.writer.add_scalar("val/cldice", metrics["cldice"], run.iteration)
        if batch is not None:
            run.writer.add_image("train/image_salience_pred_label",
                                 image_grid(run.model, batch, logits, run.cfg.salience), run.iteration,
                                 dataformats="CHW")
    improved = metrics["dice"] > run.best
    if improved:
        run.best = metrics["dice"]
        _save(run, run.best_path, epoch_done)
    if run.env.main:
        log.info("iteration %d: val Dice %.4f clDice %.4f (best %.4f%s)", run.iteration, metrics["dice"],
                 metrics["cldice"], run.best, ", saved best_model.pth" if improved else "")
    _save(run, run.last_path, epoch_done)
    run.validated_at = run.iteration
    run.last_val_seconds = time.monotonic() - t0
    run.val_seconds += run.last_val_seconds
    run.trained_since_val = 0.0


def _save(run: _Run, path: Path, epoch_done: int) -> None:
    """Rank 0 writes a contract-1 checkpoint of the current state (after checking the losses)."""
    run.monitor.flush()
    if not run.env.main:
        return
    cfg = run.cfg
    config = {**cfg.to_json(), "world_size": run.env.world_size,
              "lr_horizon_iterations": lr_horizon(cfg, run.per_epoch)}
    save_checkpoint(path, run.model, model_name=cfg.backbone, model_kwargs=cfg.model_kwargs,
                    salience=cfg.salience, config=config, out_channels=len(cfg.classes) if cfg.classes else 1, epoch=epoch_done, iteration=run.iteration,
                    best_metric=run.best, head_sha256=run.head_sha, img_size=cfg.img_size, patch_size=cfg.patch_size,
                    target_spacing=cfg.target_spacing, mm_per_pixel=run.mm_per_pixel, generator=run.generator,
                    optimizer=run.optimizer, scheduler=run.scheduler,
                    scaler=run.scaler if run.scaler.is_enabled() else None,
                    min_component_mm3=cfg.min_component_mm3, manifests=run.stage.as_dict())
    if path == run.last_path:
        run.saved_at = time.monotonic()


def _epoch_end_validation_due(run: _Run) -> bool:
    """``val_every`` 0: validate unless it would push validation above ``val_fraction`` of the time."""
    if run.last_val_seconds is None:
        return True
    f = run.cfg.val_fraction
    return _agreed(run.last_val_seconds * (1 - f) <= f * run.trained_since_val, run.env)


def _stop_reason(run: _Run, deadline: Optional[float]) -> Optional[str]:
    cfg = run.cfg
    if cfg.max_iterations and run.iteration >= cfg.max_iterations:
        return "max_iterations"
    # under DDP the ranks agree only at loss checks (a collective per step would sync every step)
    if deadline is not None and (not run.env.distributed or run.iteration % cfg.log_every == 0):
        if _agreed(time.monotonic() > deadline, run.env):
            return "max_minutes"
    return None


def step_seed(seed: int, iteration: int) -> int:
    """The torch seed of the training step after ``iteration`` steps: distinct for every (seed, iteration)
    with iteration < 1e6."""
    return int(seed) * 1_000_003 + int(iteration)


def _train(cfg: TrainConfig, env: Env) -> TrainResult:
    t_start = time.monotonic()
    run = _setup(cfg, env, t_start)
    if run.complete:
        if env.main:
            log.info("%s: the run is complete (epoch %d of %d, iteration %d%s); nothing to train", run.last_path,
                     run.epoch, cfg.max_epochs, run.iteration,
                     f" of max_iterations {cfg.max_iterations}" if cfg.max_iterations else "")
        return TrainResult(env.main, run.run_dir, run.epoch, run.iteration, run.best, [], "complete",
                           unwrap(run.model))
    deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes is not None else None
    skip = max(0, run.iteration - run.epoch * run.per_epoch)
    batches = iter(make_loader(cfg, env, run.train_set, run.epoch, skip))
    stopped_by, epochs_this_run, batch, logits = "max_epochs", 0, None, None
    while run.epoch < cfg.max_epochs:
        run.model.train()
        if cfg.freeze_bn:
            freeze_norm_statistics(run.model)
        bar = tqdm(range(run.per_epoch - skip), desc=f"epoch {run.epoch + 1}/{cfg.max_epochs}", disable=not env.main,
                   leave=False, dynamic_ncols=True)
        stop, t_epoch = None, time.monotonic()
        for _ in bar:
            batch = next(batches)
            # one seed per step, not per epoch: a run resumed mid-epoch draws the dropout masks of
            # the uninterrupted run (the checkpoint keeps no generator state)
            torch.manual_seed(step_seed(cfg.seed, run.iteration))
            logits = _train_step(run, batch)
            if run.iteration % cfg.log_every == 0:
                bar.set_postfix(loss=f"{run.monitor.flush():.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
            if cfg.val_every and run.iteration % cfg.val_every == 0:
                run.trained_since_val += time.monotonic() - t_epoch
                _validate(run, run.epoch, batch, logits)
                t_epoch = time.monotonic()
            stop = _stop_reason(run, deadline)
            if stop:
                break
        bar.close()
        skip = 0
        run.monitor.flush()
        run.trained_since_val += time.monotonic() - t_epoch
        if stop is None:
            run.epoch += 1
            epochs_this_run += 1
            if env.main:
                log.info("epoch %d/%d done, iteration %d, mean loss %.4f", run.epoch, cfg.max_epochs, run.iteration,
                         float(np.mean(run.monitor.losses[-run.per_epoch:])) if run.monitor.losses else float("nan"))
            if cfg.stop_after_epochs and epochs_this_run >= cfg.stop_after_epochs and run.epoch < cfg.max_epochs:
                stop = "stop_after_epochs"
        final = stop is not None or run.epoch >= cfg.max_epochs
        if run.validated_at != run.iteration and (final or (not cfg.val_every and _epoch_end_validation_due(run))):
            _validate(run, run.epoch, batch, logits)
        elif final or time.monotonic() - run.saved_at > 60 * cfg.save_minutes:
            _save(run, run.last_path, run.epoch)
        if stop:
            stopped_by = stop
            break
    _sync_buffers(run)
    if env.main:
        run.writer.close()
        log.info("finished (%s) after %d iterations; best val Dice %.4f; validation took %.1f s; checkpoints in %s",
                 stopped_by, run.iteration, run.best, run.val_seconds, run.run_dir)
    return TrainResult(env.main, run.run_dir, run.epoch, run.iteration, run.best, run.monitor.losses, stopped_by,
                       unwrap(run.model), run.monitor.flush_times, run.val_seconds)


def _agreed(flag: bool, env: Env) -> bool:
    """All ranks decide together (time budget, validation cadence): rank 0's clock rules."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.broadcast(t, 0)
    return bool(t.item())
