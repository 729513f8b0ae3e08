"""Every training option in one dataclass, importable without torch (``main.py --help`` is fast).

main.py fills :class:`TrainConfig` from the command line (same names); trainer.train runs it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from dataloaders.inputs import (check_bias_aug, check_blur_aug, check_context, check_elastic_aug, check_rotate_aug,
                               check_scale_aug, input_channels)

LOSS_TERMS = ("bce", "dice", "cldice")


def loss_terms(name: str) -> list[str]:
    """The terms of ``--loss`` (``bce``, ``dice``, ``cldice`` or a ``+``-joined sum), or ValueError
    naming the valid ones; torch-free, so a typo fails before the data is read."""
    terms = [t.strip() for t in str(name).lower().split("+")]
    bad = [t for t in terms if t not in LOSS_TERMS]
    if not terms or bad:
        raise ValueError(f"unknown loss {name!r}; terms: {', '.join(LOSS_TERMS)}, joined by '+' (e.g. bce+dice)")
    return terms


@dataclass
class TrainConfig:
    """Every training option; main.py fills it from the command line (same names).

    Speed options (defaults suit a GPU): ``deterministic`` is opt-in (cudnn.benchmark is on
    otherwise; CPU runs give identical losses either way, GPU runs only with it);
    ``val_every`` 0 validates at epoch ends, skipping those that would push validation above
    ``val_fraction`` of the wall time; the loss stays on the device and is checked for
    NaN/inf (and logged) every ``log_every`` iterations; ``cache_data`` holds the 2-D
    training slices in memory (float16) instead of decoding HDF5 for every item.
    """

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
    freeze_bn: bool = False  # keep init_from's normalisation statistics while fine-tuning
    patch_size: Sequence[int] = (64, 64, 64)
    patches_per_epoch: int = 250
    fg_fraction: float = 1 / 3
    augment: bool = True  # rot90 and flips of half the training items; the other augmentations have their own fields
    intensity_jitter: bool = False
    domain_aug: bool = False  # sim-to-real intensity randomisation (dataloaders.transforms.intensity_domain)
    scale_aug: float = 0.0  # 2-D: zoom each training slice by a log-uniform factor in [1/(1+s), 1+s] (0: off)
    rotate_aug: float = 0.0  # 2-D: rotate each training slice in-plane by U(-r, r) degrees (0: off); no flip
    elastic_aug: float = 0.0  # 2-D with target_spacing: bend each slice by a smooth field, components up to E mm (0: off)
    bias_aug: float = 0.0  # 2-D with target_spacing: add a smooth shading of up to B HU to each image (0: off)
    blur_aug: float = 0.0  # half the items blurred in-plane, sigma U(0.3, s) pixels (dataloaders.transforms.gaussian_blur)
    context_slices: int = 0  # 2-D: the images of K slices above and below as 2K more input channels
    min_component_mm3: float = 0.0  # inference post-processing recorded in the checkpoint (0: none)
    classes: Optional[list] = None  # one output per class of the class map, e.g. ["portal", "hepatic"]; None: binary
    max_iterations: Optional[int] = None
    max_minutes: Optional[float] = None
    stop_after_epochs: Optional[int] = None
    val_every: int = 0
    val_fraction: float = 0.1
    val_batch_size: int = 8
    val_overlap: float = 0.5
    log_every: int = 10
    save_minutes: float = 10.0
    num_workers: int = 2
    prefetch_factor: int = 4
    cache_data: bool = False
    channels_last: bool = False
    seed: int = 1234
    deterministic: bool = False
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
        if self.target_spacing is not None and not self.target_spacing > 0:
            raise ValueError(f"--target_spacing must be a positive number of mm, got {self.target_spacing}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.val_batch_size < 1 or self.patches_per_epoch < 1:
            raise ValueError(f"--batch_size, --max_epochs, --val_batch_size and --patches_per_epoch must be >= 1, got "
                             f"{self.batch_size}, {self.max_epochs}, {self.val_batch_size}, {self.patches_per_epoch}")
        # 0 would read as "no limit" where the limit is tested for truth
        for opt in ("max_iterations", "stop_after_epochs"):
            if getattr(self, opt) is not None and getattr(self, opt) < 1:
                raise ValueError(f"--{opt} must be >= 1 (leave it out for no limit), got {getattr(self, opt)}")
        if self.val_every < 0 or self.save_minutes < 0 or (self.max_minutes is not None and self.max_minutes < 0):
            raise ValueError(f"--val_every (0: at epoch ends), --save_minutes (0: at every epoch end) and "
                             f"--max_minutes must be >= 0, got {self.val_every}, {self.save_minutes}, {self.max_minutes}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip_grad must be >= 0, got {self.clip_grad}")
        loss_terms(self.loss)
        if self.base_lr <= 0:
            raise ValueError(f"--base_lr must be > 0, got {self.base_lr}")
        if self.log_every < 1 or self.prefetch_factor < 1 or self.num_workers < 0:
            raise ValueError(f"--log_every and --prefetch_factor must be >= 1 and --num_workers >= 0, got "
                             f"{self.log_every}, {self.prefetch_factor}, {self.num_workers}")
        if not 0 < self.val_fraction <= 1:
            raise ValueError(f"--val_fraction must be in (0, 1], got {self.val_fraction}")
        if not 0 <= self.fg_fraction <= 1:
            raise ValueError(f"--fg_fraction must be in [0, 1], got {self.fg_fraction}")
        # checked here, not at the first validation after hours of training
        if not 0 <= self.val_overlap < 1:
            raise ValueError(f"--val_overlap must be in [0, 1), got {self.val_overlap}")
        if self.min_component_mm3 < 0:
            raise ValueError(f"--min_component_mm3 must be >= 0 mm^3, got {self.min_component_mm3}")
        self.scale_aug = check_scale_aug(self.scale_aug)
        self.blur_aug = check_blur_aug(self.blur_aug)
        self.rotate_aug = check_rotate_aug(self.rotate_aug)
        self.elastic_aug = check_elastic_aug(self.elastic_aug)
        self.bias_aug = check_bias_aug(self.bias_aug)
        if self.freeze_bn and not self.init_from:
            raise ValueError("--freeze_bn keeps the statistics of the --init_from weights: give --init_from")
        input_channels(self.salience)
        self.context_slices = check_context(self.context_slices, self.salience)
        if self.classes is not None:
            self.classes = [str(c).strip().lower() for c in self.classes if str(c).strip()]
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                raise ValueError(f"--classes needs two or more different classes, e.g. portal,hepatic; got {self.classes}")
        if self.exp is None:
            self.exp = self.salience

    def run_dir(self) -> Path:
        """The seed's layout: <output_root>/<dataset>/<backbone>/epo<E>_bs<B>_lr<L>/<exp>."""
        backbone = self.backbone.replace(":", "_")
        return (Path(self.output_root) / self.dataset / backbone
                / f"epo{self.max_epochs}_bs{self.batch_size}_lr{self.base_lr:g}" / str(self.exp))

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def differences(self, saved: dict, ignore: frozenset[str] = frozenset()) -> list[str]:
        """The options on which a run's saved config (``to_json`` of the config it was trained
        with) differs from this one, as "name: here vs saved"; options in ``RUNTIME_OPTIONS``
        (how a run executes, not what it learns) are left out, and an option the saved config
        lacks (a run from before the option existed) counts as its default. Options named in
        ``ignore`` are left out too."""
        here = self.to_json()
        defaults = TrainConfig(dataset=self.dataset, salience=self.salience).to_json()
        out = []
        for name, value in here.items():
            if name in RUNTIME_OPTIONS or name in ignore:
                continue
            old = saved.get(name, defaults[name])
            if old != value:
                out.append(f"{name}: {value!r} here vs {old!r}")
        return out


# options that change how a run executes (device, speed, logging, restarts), not what it learns
RUNTIME_OPTIONS = frozenset({"overwrite", "resume", "device", "num_workers", "prefetch_factor", "cache_data",
                             "channels_last", "amp", "log_every", "save_minutes", "val_batch_size"})
# what a resumed run may change besides those: where it stops
RESUMABLE_OPTIONS = frozenset({"max_iterations", "max_minutes", "stop_after_epochs"})
