"""Train a vessel segmentation network (the seed's command line, kept).

    python main.py --dataset 3D-IRCADb --backbone unet [--salience offline|e2e|none]
    torchrun --nproc_per_node N main.py ...          # data-parallel (DDP)

Runs on CUDA when present (AMP), else on the CPU. All the work is trainer.train();
this file only parses arguments (torch is imported only after that, so --help is
instant). See trainer.py for the run folder layout.

Speed: one persistent DataLoader for the run (--num_workers, --prefetch_factor);
--cache_data holds the 2-D training slices in memory (float16) instead of decoding HDF5
each time; cudnn.benchmark is on unless --deterministic 1 (bit-reproducible GPU runs;
CPU runs give identical losses either way); validation by default at epoch ends, at most
--val_fraction of the wall time; losses are checked and logged every --log_every steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from dataloaders.inputs import BIAS_MAX_HU, BIAS_SMOOTH_MM, ELASTIC_MAX_MM, ELASTIC_SMOOTH_MM
from train_config import RESUMABLE_OPTIONS, TrainConfig
from utils.logging_setup import setup_logging


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1, got {v!r}")


def _kwargs(v: str) -> dict:
    try:
        d = json.loads(v)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--model_kwargs must be a JSON object ({e})") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError("--model_kwargs must be a JSON object, e.g. '{\"base_channels\": 32}'")
    return d


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(dataset="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset name: data at <root_path>/<dataset>")
    p.add_argument("--root_path", default=d.root_path)
    p.add_argument("--list_dir", default=d.list_dir)
    p.add_argument("--backbone", default=d.backbone,
                   help="registry name (unet, unet3d, attention_unet, unetpp, monai:<Class>)")
    p.add_argument("--model_kwargs", type=_kwargs, default={}, help="JSON object of backbone arguments")
    p.add_argument("--salience", default=d.salience, choices=("offline", "e2e", "none"))
    p.add_argument("--head", default=None, help="e2e: initialise the salience head from this file")
    p.add_argument("--output_root", default=d.output_root)
    p.add_argument("--exp", default=None, help="experiment name (run sub-folder); default: the salience mode")
    p.add_argument("--max_epochs", type=int, default=d.max_epochs)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--base_lr", type=float, default=d.base_lr)
    p.add_argument("--optimizer", default=d.optimizer, choices=("sgd", "adamw"))
    p.add_argument("--momentum", type=float, default=d.momentum, help="--optimizer sgd only")
    p.add_argument("--weight_decay", type=float, default=d.weight_decay)
    p.add_argument("--poly_power", type=float, default=d.poly_power)
    p.add_argument("--loss", default=d.loss, help="bce, dice, cldice or a '+' sum, e.g. bce+dice")
    p.add_argument("--cldice_iterations", type=int, default=d.cldice_iterations)
    p.add_argument("--clip_grad", type=float, default=d.clip_grad, help="max gradient norm (0: off)")
    p.add_argument("--img_size", type=int, nargs=2, default=list(d.img_size), metavar=("H", "W"),
                   help="2-D input size; equal to the stored size means no resizing")
    p.add_argument("--target_spacing", type=float, default=d.target_spacing, metavar="MM",
                   help="2-D: resample every slice to MM mm per pixel in-plane, then pad/crop to --img_size "
                        "(test.py resamples each case the same way); default: resize by pixels to --img_size")
    p.add_argument("--init_from", default=d.init_from, metavar="CKPT",
                   help="start from this checkpoint's weights (backbone, and the e2e head when both are e2e)")
    p.add_argument("--freeze_bn", type=_bool, default=d.freeze_bn,
                   help="with --init_from: keep its BatchNorm running statistics while training (the affine "
                        "weights still learn); batches of one patient's slices make poor statistics")
    p.add_argument("--patch_size", type=int, nargs=3, default=list(d.patch_size), metavar=("H", "W", "D"),
                   help="3-D: the training patch and the sliding window of validation, test.py and predict.py")
    p.add_argument("--patches_per_epoch", type=int, default=d.patches_per_epoch,
                   help="3-D: random patches in one epoch")
    p.add_argument("--fg_fraction", type=float, default=d.fg_fraction,
                   help="3-D: share of the patches centred on a vessel voxel (the others anywhere)")
    p.add_argument("--augment", type=_bool, default=d.augment,
                   help="random quarter turns and flips of half the training items (the seed's); the zoom, blur "
                        "and intensity augmentations have their own options and do not depend on this one")
    p.add_argument("--intensity_jitter", type=_bool, default=d.intensity_jitter)
    p.add_argument("--domain_aug", type=_bool, default=d.domain_aug,
                   help="randomise contrast (x0.5-1.5), level (+-24 HU) and noise (up to 8 HU) of the training "
                        "images: for models trained on phantoms and run on real CT")
    p.add_argument("--scale_aug", type=float, default=d.scale_aug, metavar="S",
                   help="2-D: zoom each training slice by a log-uniform factor in [1/(1+S), 1+S] before the "
                        "pad/crop to --img_size, so one calibre is seen at several widths (0: off)")
    p.add_argument("--rotate_aug", type=float, default=d.rotate_aug, metavar="DEG",
                   help="2-D: rotate each training slice in-plane by a uniform angle in [-DEG, DEG] degrees "
                        "before the pad/crop to --img_size; unlike --augment's quarter turns and flips it keeps "
                        "the patient's left and right (0: off)")
    p.add_argument("--elastic_aug", type=float, default=d.elastic_aug, metavar="MM",
                   help=f"2-D, with --target_spacing: bend each training slice by a smooth random field "
                        f"({ELASTIC_SMOOTH_MM:g} mm smoothness) whose largest row or column displacement is uniform "
                        f"in [0, MM] mm (at most {ELASTIC_MAX_MM:g}), so one patient's organs are seen in other "
                        f"shapes (0: off)")
    p.add_argument("--bias_aug", type=float, default=d.bias_aug, metavar="HU",
                   help=f"2-D, with --target_spacing: add to each training image (and its context slices) a smooth "
                        f"random shading ({BIAS_SMOOTH_MM:g} mm smoothness) of at most U(0, HU) Hounsfield units, "
                        f"so unevenly enhanced organs are still recognised (at most {BIAS_MAX_HU:g}; 0: off)")
    p.add_argument("--blur_aug", type=float, default=d.blur_aug, metavar="S",
                   help="blur half the training images in-plane with a Gaussian of sigma U(0.3, S) pixels of the "
                        "grid the model sees (labels and salience unblurred): scanners differ in sharpness and "
                        "real vessel edges are softer than phantoms' (0: off)")
    p.add_argument("--context_slices", type=int, default=d.context_slices, metavar="K",
                   help="2-D, salience none or offline: give the model the images of the K slices above and "
                        "below each slice too (2K more input channels, 2.5-D); which structure a blob in one "
                        "slice belongs to often shows only in its neighbours (0: one slice)")
    p.add_argument("--min_component_mm3", type=float, default=d.min_component_mm3, metavar="MM3",
                   help="post-processing recorded in the checkpoint and used by validation, test.py and "
                        "predict.py: drop predicted components smaller than MM3 mm^3 (0: keep all)")
    p.add_argument("--classes", type=lambda v: v.split(","), default=None, metavar="A,B",
                   help="one output per vessel tree of the data's class map (preprocess.py --vessel_classes), "
                        "e.g. portal,hepatic; default: one binary vessel output")
    p.add_argument("--max_iterations", type=int, default=None, help="stop after this many iterations in all")
    p.add_argument("--max_minutes", type=float, default=None, help="stop after this wall time (minutes)")
    p.add_argument("--stop_after_epochs", type=int, default=None,
                   help="stop after this many epochs in this run, keeping the --max_epochs schedule")
    p.add_argument("--val_every", type=int, default=d.val_every,
                   help="validate every N iterations (0: at epoch ends, within --val_fraction of the time)")
    p.add_argument("--val_fraction", type=float, default=d.val_fraction,
                   help="with --val_every 0: skip epoch-end validations that would take more than this "
                        "fraction of the wall time (1: validate every epoch)")
    p.add_argument("--val_batch_size", type=int, default=d.val_batch_size)
    p.add_argument("--val_overlap", type=float, default=d.val_overlap,
                   help="3-D: overlap of the validation's sliding windows, in [0, 1)")
    p.add_argument("--log_every", type=int, default=d.log_every,
                   help="check the loss for NaN/inf and log it every N iterations (one host sync each)")
    p.add_argument("--save_minutes", type=float, default=d.save_minutes,
                   help="also write last.pth at an epoch end when the last write is this old")
    p.add_argument("--num_workers", type=int, default=d.num_workers)
    p.add_argument("--prefetch_factor", type=int, default=d.prefetch_factor, help="batches queued per worker")
    p.add_argument("--cache_data", type=_bool, default=d.cache_data,
                   help="2-D: read the training slices once into memory (float16), shared with the workers")
    p.add_argument("--channels_last", type=_bool, default=d.channels_last,
                   help="channels-last memory format (often faster convolutions on GPUs under AMP)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--deterministic", type=_bool, default=d.deterministic,
                   help="reproducible GPU kernels, cudnn.benchmark off (slower); CPU runs are reproducible anyway")
    p.add_argument("--amp", type=_bool, default=d.amp, help="mixed precision on CUDA (bf16, else fp16)")
    p.add_argument("--device", default=d.device, choices=("auto", "cuda", "cpu"))
    p.add_argument("--resume", action="store_true", help="continue from last.pth in the run folder")
    p.add_argument("--overwrite", action="store_true", help="start again in a run folder that has checkpoints")
    p.add_argument("--print_run_dir", action="store_true",
                   help="print the run folder these options give and exit (for scripts)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a finished run trained with these options instead of training again; a finished run "
                        "made with other options is an error (exit 2); a run that stopped early is started again "
                        "(for scripts that reuse finished runs)")
    return p


REUSE, NO_RUN, OTHER_OPTIONS = 0, 3, 2


def check_reuse(cfg: TrainConfig) -> tuple[int, str]:
    """Can ``--reuse`` keep the run in ``cfg.run_dir()`` instead of training? (status, message).

    REUSE: its ``last.pth`` reached ``max_iterations`` (or ``max_epochs``) and was trained with
    the options of ``cfg`` (``TrainConfig.differences`` of the config saved in the checkpoint) on
    the same data (its stage manifests, :func:`data_changes`).
    NO_RUN: no ``last.pth``, a run that stopped early (time limit, interruption), or one trained
    on other data: train it (again).
    OTHER_OPTIONS: a finished run made with other options, which must not be passed off as
    this one's nor overwritten unasked; the message names the file and the options (it is
    also the exit status of ``--reuse`` then).
    """
    from networks.checkpoint import load_checkpoint  # torch: only here

    last = cfg.run_dir() / "last.pth"
    if not last.is_file():
        return NO_RUN, f"{last}: no run yet"
    try:
        ckpt = load_checkpoint(last)
    except ValueError as e:
        return OTHER_OPTIONS, f"{e}; delete the run folder or train with --overwrite"
    saved = ckpt.get("config") or {}
    max_iterations, max_epochs = int(saved.get("max_iterations") or 0), int(saved.get("max_epochs") or 0)
    reached_iterations = max_iterations > 0 and int(ckpt.get("iteration", 0)) >= max_iterations
    reached_epochs = max_epochs > 0 and int(ckpt.get("epoch", 0)) >= max_epochs
    # a run stopped (by time) at the last batch of its last epoch has trained them all: its
    # checkpoint names that epoch, but its iterations reach the schedule's horizon
    horizon = int(saved.get("lr_horizon_iterations") or 0)
    reached_horizon = horizon > 0 and int(ckpt.get("iteration", 0)) >= horizon
    finished = reached_iterations or reached_epochs or reached_horizon
    if not finished:
        return NO_RUN, f"{last}: a run that stopped early (iteration {ckpt.get('iteration')})"
    # a time limit or an epochs-per-job limit does not change a model that has finished
    diffs = cfg.differences(saved, ignore=RESUMABLE_OPTIONS - {"max_iterations"})
    if diffs:
        return OTHER_OPTIONS, (f"{last}: trained with other options ({'; '.join(diffs)}); delete the run folder, "
                               f"change --exp, or train with --overwrite")
    changed = data_changes(cfg, ckpt.get("manifests") or {})
    if changed:
        return NO_RUN, f"{last}: trained on other data ({'; '.join(changed)}): training again"
    from networks.registry import backbone_source

    if (ckpt.get("backbone_source") or None) != backbone_source(cfg.backbone):
        # a plug-in edited since (or a backbone now registered by other code): other code, other model
        return NO_RUN, f"{last}: trained with another version of backbone {cfg.backbone}'s code: training again"
    return REUSE, f"{last}: finished, same options, same data"


def data_changes(cfg: TrainConfig, trained_on: dict) -> list[str]:
    """Which of the data's stage manifests (utils.manifests) differ from those a run was trained on:
    a finished run on other data (preprocessed or salience made again since) is not this run."""
    from utils import manifests
    from utils.h5io import DatasetPaths

    paths = DatasetPaths.of(cfg.root_path, cfg.dataset, cfg.list_dir)
    now = manifests.read_stage(paths, with_salience=cfg.salience == "offline")
    return [f"{key} manifest {'changed' if why == 'missing now' else why}"
            for key, why in manifests.changes(trained_on, now).items()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = vars(build_parser().parse_args(argv))
    print_run_dir = args.pop("print_run_dir")
    reuse = args.pop("reuse")
    setup_logging(logging.INFO)
    err = logging.getLogger("main").error
    try:
        cfg = TrainConfig(**args)
    except ValueError as e:
        err("%s", e)
        return 1
    if print_run_dir:
        print(cfg.run_dir())
        return 0
    if reuse:
        status, message = check_reuse(cfg)
        if status == OTHER_OPTIONS:
            err("%s", message)
            return OTHER_OPTIONS
        if status == REUSE:
            logging.getLogger("main").info("reusing %s", message)
            return 0
        cfg.overwrite = True  # nothing finished there: (re)start the run
    from trainer import TrainingError, train  # torch and the models: only when training

    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, TrainingError) as e:
        err("%s", e)
        return 1
    if result.main and result.stopped_by == "complete":
        print(f"run complete (iteration {result.iteration}, best val Dice {result.best_metric:.4f}); checkpoints in "
              f"{result.run_dir}")
    elif result.main:
        print(f"best val Dice {result.best_metric:.4f}; checkpoints in {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
