"""Offline connectivity-aware salience: fit a generator (optional) and write the maps.

    python salience_generation.py --dataset 3D-IRCADb [--generator bank|fpn|analytic] [--weights FILE]
                                  [--fit --iters 2000 --lr 1e-3 --batch 8 --seed 0] [--device cpu] [--overwrite]

Generation writes ``<root>/<dataset>/vol_salience/<case>.h5`` (salience float32 (3, H, W, D)
in [0, 1]; attrs generator, weights_sha256) for every case of the vol_train/val/test lists,
and adds ``salience`` (3, H, W) to every ``slice_data/<case>_slice<NNNN>.h5`` of the case.
The maps' manifest ``vol_salience/manifest.json`` (utils.manifests) records the generator,
its parameters, the weights' sha256 and path, the normalisation rule and the dataset.json
the maps were made from; main.py reads it. Complete outputs made by the same generator,
weights and normalisation are skipped unless
``--overwrite``; those made otherwise are computed again (with a warning). Every file is
written atomically.

``--normalisation fixed`` (bank): every plane is standardised with the same constants and the
head's output is stored as it is, so a voxel's salience does not depend on how far the scan
extends (docs/DESIGN.md); ``volume`` is the paper's rule (per-plane statistics, min-max over
the volume).

``--fit`` trains the ``bank`` head (or the seed ``fpn``, from scratch or from ``--weights``)
on planes of all three orientations of the training volumes (target: the vessel mask of
the plane; loss BCE + soft Dice), saves a self-describing checkpoint under
``checkpoint/salience/<dataset>/<generator>_fit.pth`` and then generates with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from inference.predictor import resolve_device
from losses import make_loss
from networks.salience import (
    DEFAULT_MAX_BATCH_VOXELS,
    FPN_BLOCKS,
    GENERATORS,
    HEAD_FORMAT,
    KERNEL_SIZE,
    NORMALISATIONS,
    REFERENCE_MARGIN,
    SalienceHead,
    SeedFPN,
    bank_parameters,
    default_head_path,
    file_sha256,
    head_state_from,
    load_fpn,
    load_head,
    make_generator,
    salience_3d,
    square_wave_bank,
    standardise_planes,
    standardise_planes_fixed,
)
from utils import manifests
from utils.atomic import atomic_path
from utils.cli import given_options
from utils.h5io import (SPLITS, DatasetPaths, read_list, read_salience, read_volume, salience_made_by,
                        salience_volume_sha256, write_salience)
from utils.logging_setup import setup_logging
from utils.provenance import file_sha256
from utils.torch_io import load_torch_file

log = logging.getLogger("salience_generation")

#: the default rule for the bank generator (the others support ``volume`` only): ``fixed``, so that
#: the maps of a scan do not depend on how far it extends (docs/DESIGN.md section 1a; measured in
#: results/extent_invariance_*.json); ``--normalisation volume`` is the paper's rule
DEFAULT_NORMALISATION = "fixed"


def default_normalisation(generator: str) -> str:
    """The normalisation rule a generator gets when none is asked for."""
    return DEFAULT_NORMALISATION if generator == "bank" else "volume"


# ----------------------------------------------------------------------------- fitting
@dataclass
class FitConfig:
    """Head / fpn fitting options. ``patch``: side (pixels) of the plane patches the loss sees."""

    iters: int = 2000
    lr: float = 1e-3
    batch: int = 8
    patch: int = 96
    seed: int = 0
    vessel_fraction: float = 0.7
    normalisation: str = "volume"  # networks.salience.NORMALISATIONS: how the planes are standardised
    extra: dict = field(default_factory=dict)


class PlaneSampler:
    """Random patches of standardised planes of all three orientations, with their vessel masks.

    A sample: a training volume, an orientation (transverse V[:, :, d], coronal V[h, :, :],
    sagittal V[:, w, :]), a centre voxel (a vessel voxel with probability
    ``vessel_fraction``, otherwise any voxel), the plane through it standardised as in
    generation, and a (patch + 16)^2 window around the centre (the 8-pixel context makes
    the loss see exactly what generation computes). Zero outside the plane.
    """

    def __init__(self, volumes: Sequence[tuple[np.ndarray, np.ndarray]], patch: int, vessel_fraction: float,
                 rng: np.random.Generator, normalisation: str = "volume") -> None:
        if not volumes:
            raise ValueError("no training volumes to fit on")
        self.volumes = volumes
        self.patch = patch
        self.vessel_fraction = vessel_fraction
        self.rng = rng
        self.vessel_idx = [np.flatnonzero(lab) for _, lab in volumes]
        self.standardise = standardise_planes if normalisation == "volume" else standardise_planes_fixed

    def _plane(self, arr: np.ndarray, orient: int, centre: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        h, w, d = centre
        if orient == 0:
            return arr[:, :, d], (h, w)
        if orient == 1:
            return arr[h, :, :], (w, d)
        return arr[:, w, :], (h, d)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, 1, patch + 16, patch + 16) float32 and targets (B, 1, patch, patch) float32."""
        m, p = REFERENCE_MARGIN, self.patch
        xs, ys = [], []
        for _ in range(batch):
            i = int(self.rng.integers(len(self.volumes)))
            image, label = self.volumes[i]
            vi = self.vessel_idx[i]
            if vi.size and self.rng.random() < self.vessel_fraction:
                flat = int(vi[self.rng.integers(vi.size)])
            else:
                flat = int(self.rng.integers(image.size))
            centre = np.unravel_index(flat, image.shape)
            orient = int(self.rng.integers(3))
            img, (r, c) = self._plane(image, orient, centre)
            lab, _ = self._plane(label, orient, centre)
            std = self.standardise(torch.from_numpy(np.ascontiguousarray(img))[None, None])[0, 0].numpy()
            jitter = self.rng.integers(-p // 4, p // 4 + 1, size=2)
            r0 = int(r + jitter[0]) - p // 2 - m
            c0 = int(c + jitter[1]) - p // 2 - m
            xs.append(_window(std, r0, c0, p + 2 * m))
            ys.append(_window(lab.astype(np.float32), r0 + m, c0 + m, p))
        x = torch.from_numpy(np.stack(xs)[:, None])
        y = torch.from_numpy(np.stack(ys)[:, None])
        return x, y


def _window(a: np.ndarray, r0: int, c0: int, n: int) -> np.ndarray:
    """a[r0:r0+n, c0:c0+n] with zeros outside ``a``."""
    out = np.zeros((n, n), dtype=np.float32)
    rs, cs = max(r0, 0), max(c0, 0)
    re_, ce = min(r0 + n, a.shape[0]), min(c0 + n, a.shape[1])
    if re_ > rs and ce > cs:
        out[rs - r0 : re_ - r0, cs - c0 : ce - c0] = a[rs:re_, cs:ce]
    return out


def fit_generator(
    paths: DatasetPaths,
    cases: Sequence[str],
    kind: str,
    out_path: Path,
    config: FitConfig,
    *,
    init_weights: Optional[Path] = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Fit the ``bank`` head or the ``fpn`` network on the training ``cases``; save to ``out_path``.

    Returns ``out_path``. The checkpoint is a dict: format, generator, bank (parameters),
    state_dict, data (dataset folder and cases), fit (options), loss_curve, created.
    """
    if kind not in ("bank", "fpn"):
        raise ValueError(f"--fit works for generators bank and fpn, not {kind!r}")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: fitted checkpoint exists (pass --overwrite, or use it with --weights)")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    volumes = []
    for case in cases:
        vol = read_volume(paths.volume(case), with_liver=False)
        volumes.append((vol.image, vol.label))
    sampler = PlaneSampler(volumes, config.patch, config.vessel_fraction, rng, config.normalisation)
    dev = torch.device(device)
    init_sha = ""
    if kind == "bank":
        model: torch.nn.Module = load_head(init_weights).train() if init_weights else SalienceHead()
        bank = square_wave_bank().to(dev)

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            return model.logits(F.conv2d(x, bank, padding=KERNEL_SIZE // 2))
    else:
        model = load_fpn(init_weights).train() if init_weights else SeedFPN()

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            return model(x, return_logit=True)
    if init_weights:
        init_sha = file_sha256(init_weights)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    m = REFERENCE_MARGIN
    curve: list[float] = []
    loss_fn = make_loss("bce+dice")  # the training losses: BCE + soft Dice over the batch
    bar = tqdm(range(config.iters), desc=f"fit {kind}", unit="it", dynamic_ncols=True)
    for it in bar:
        x, y = sampler.sample(config.batch)
        x, y = x.to(dev), y.to(dev)
        logit = logits_of(x)[:, :, m:-m, m:-m]
        loss = loss_fn(logit, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
        if it % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(curve[-20:]):.4f}")
    model.eval().cpu()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = {
        "format": HEAD_FORMAT,
        "generator": kind,
        "bank": bank_parameters() if kind == "bank" else None,
        "state_dict": state,
        "data": {"dataset_root": str(paths.root), "cases": list(cases), "split": "train"},
        "fit": {
            "iters": config.iters, "lr": config.lr, "batch": config.batch, "patch": config.patch,
            "seed": config.seed, "vessel_fraction": config.vessel_fraction, "optimizer": "Adam",
            "loss": "BCE + soft Dice", "planes": "transverse, coronal, sagittal",
            "normalisation": config.normalisation,
            "init_weights": str(init_weights) if init_weights else None, "init_sha256": init_sha,
            **config.extra,
        },
        "loss_curve": curve,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__),
    }
    if kind == "bank":  # a checkpoint that does not round-trip must not be written
        head_state_from(state, str(out_path))
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        torch.save(ckpt, tmp)
    log.info("fitted %s on %d cases, final loss %.4f (mean of last 50): %s", kind, len(cases),
             float(np.mean(curve[-50:])) if curve else float("nan"), out_path)
    return out_path


# ----------------------------------------------------------------------------- generation
def list_cases(paths: DatasetPaths) -> list[str]:
    """Cases of vol_train, vol_val, vol_test, in that order, without repeats."""
    seen: dict[str, None] = {}
    for split in SPLITS:
        for case in read_list(paths.list_file(f"vol_{split}")):
            seen.setdefault(case, None)
    return list(seen)


def case_slices(paths: DatasetPaths, case: str) -> list[tuple[int, Path]]:
    """(slice index, file) of the case's slice_data files."""
    if not paths.slice_data.is_dir():
        return []
    out = []
    for f in sorted(paths.slice_data.glob(f"{case}_slice*.h5")):
        idx = f.stem[len(case) + len("_slice"):]
        if idx.isdigit():
            out.append((int(idx), f))
    return out


def _salience_ok(path: Path, shape: tuple[int, ...]) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return "salience" in f and tuple(f["salience"].shape) == shape
    except OSError:
        return False


def _volume_shape(path: Path) -> tuple[int, int, int]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: volume file not found")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise ValueError(f"{path}: no 'image' dataset")
            shape = tuple(f["image"].shape)
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None
    if len(shape) != 3:
        raise ValueError(f"{path}: image must be (H, W, D), got shape {shape}")
    return shape  # type: ignore[return-value]


def add_slice_salience(path: Path, salience: np.ndarray) -> None:
    """Set ``salience`` (3, H, W) in a slice file, keeping its other datasets; atomic (copy, edit, rename)."""
    with atomic_path(path, overwrite=True) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            if "image" in f and tuple(f["image"].shape) != salience.shape[1:]:
                raise ValueError(f"{path}: image shape {f['image'].shape} differs from salience {salience.shape[1:]}")
            if "salience" in f:
                del f["salience"]
            f.create_dataset("salience", data=salience.astype(np.float32), compression="gzip",
                             compression_opts=4, shuffle=True)


def generate(
    paths: DatasetPaths,
    cases: Sequence[str],
    kind: str,
    weights: Optional[Path],
    *,
    device: str = "cpu",
    overwrite: bool = False,
    max_batch_voxels: int = DEFAULT_MAX_BATCH_VOXELS,
    normalisation: str = "volume",
) -> dict[str, str]:
    """Write vol_salience and slice salience for ``cases``; returns case -> 'written' | 'skipped' | 'slices'."""
    generator = make_generator(kind, weights, normalisation)
    sha = generator.weights_sha256
    # until the loop is through, some maps may be another generator's than the manifest names (or,
    # with none, than any manifest): a run stopped midway leaves it marked in progress, and
    # training refuses the maps until a run completes
    write_maps_manifest(paths, generator, weights, {}, in_progress=True)
    status: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for case in tqdm(cases, desc=f"salience ({kind})", unit="case", dynamic_ncols=True):
        vpath = paths.volume(case)
        shape = _volume_shape(vpath)
        shapes[case] = [3, *shape]  # its map is this generator's once the loop is through
        spath = paths.salience(case)
        slices = case_slices(paths, case)
        vol_done = _salience_ok(spath, (3,) + shape)
        vol_sha = file_sha256(vpath)
        if vol_done and not overwrite and salience_volume_sha256(spath) not in ("", vol_sha):
            # preprocess.py wrote the volume again since (a fix, other raw data under the same name)
            log.warning("%s: made from another version of %s; computing it again", spath, vpath.name)
            vol_done = False
        if vol_done and not overwrite:
            old = salience_made_by(spath)
            if old != (kind, sha, normalisation):
                # maps of another generator must not pass for this one's: make them again
                log.warning("%s: made by %s (sha256 %s..., normalisation %s), not %s (sha256 %s..., normalisation "
                            "%s); computing it again", spath, old[0] or "?", old[1][:12], old[2], kind, sha[:12],
                            normalisation)
                vol_done = False
        # a map made again is copied into every slice file; otherwise only slices that lack one
        slices_todo = [(z, f) for z, f in slices
                       if overwrite or not vol_done or not _salience_ok(f, (3,) + shape[:2])]
        if vol_done and not overwrite:
            if not slices_todo:
                status[case] = "skipped"
                continue
            sal = read_salience(spath)
            status[case] = "slices"
        else:
            vol = read_volume(vpath, with_liver=False)
            sal = salience_3d(vol.image, generator, device=device, max_batch_voxels=max_batch_voxels)
            # the volume map is written after the slices: it marks the case complete, so a run stopped
            # among the slices leaves no map that a rerun would take for this generator's and whose
            # slices it would skip (still holding the previous generator's)
            spath.unlink(missing_ok=True)
            status[case] = "written"
        for z, f in slices_todo:
            if z >= shape[2]:
                raise ValueError(f"{f}: slice index {z} outside the volume's {shape[2]} slices")
            add_slice_salience(f, sal[:, :, :, z])
        if status[case] == "written":
            write_salience(spath, sal, generator=kind, weights_sha256=sha, overwrite=True, normalisation=normalisation,
                           volume_sha256=vol_sha)
    n = {s: sum(v == s for v in status.values()) for s in ("written", "slices", "skipped")}
    log.info("salience %s: %d written, %d slice-only updates, %d skipped (complete)", kind, n["written"],
             n["slices"], n["skipped"])
    write_maps_manifest(paths, generator, weights, shapes)
    return status


def generator_parameters(kind: str) -> dict:
    """What defines a generator besides its weights, for the maps' manifest."""
    if kind == "bank":
        return {"bank": bank_parameters(), "head": "Conv 60->30 3x3, ReLU, Conv 30->30 3x3, ReLU, Conv 30->1, sigmoid"}
    if kind == "fpn":
        return {"blocks_sigma_lambda_k_dilation_padding": [list(b) for b in FPN_BLOCKS]}
    return {"bank": bank_parameters(), "reduce": "max over orientations, rectified, mean over sizes",
            "scale": "99.9th percentile of the volume"}


def write_maps_manifest(paths: DatasetPaths, generator, weights: Optional[Path], cases: dict[str, list[int]],
                        in_progress: bool = False) -> Path:
    """``vol_salience/manifest.json`` for the maps ``generate`` made or kept with this generator,
    ``cases`` {case: [3, H, W, D]} (utils.manifests); the dataset.json they were made from is
    fingerprinted in it. ``in_progress``: marked as a run that has not finished (main.py refuses it)."""
    dataset = manifests.read_manifest(manifests.dataset_manifest_path(paths), manifests.DATASET_FORMAT)
    doc = manifests.salience_manifest(kind=generator.name, parameters=generator_parameters(generator.name),
                                      weights_sha256=generator.weights_sha256, weights_path=weights,
                                      normalisation=generator.normalisation, dataset=dataset, cases=cases)
    return manifests.write_salience_manifest(paths, {**doc, "in_progress": True} if in_progress else doc)


def run(
    dataset: str,
    root_path: str = "data",
    list_dir: str = "list",
    generator: str = "bank",
    weights: Optional[str] = None,
    fit: bool = False,
    fit_config: Optional[FitConfig] = None,
    checkpoint_dir: str = "checkpoint/salience",
    device: str = "cpu",
    overwrite: bool = False,
    max_batch_voxels: int = DEFAULT_MAX_BATCH_VOXELS,
    fit_only: bool = False,
    normalisation: Optional[str] = None,
) -> dict[str, str]:
    """Everything the CLI does: validate inputs, fit if asked, generate (unless ``fit_only``).

    Returns the per-case generation status (empty with ``fit_only``).
    """
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; valid: {', '.join(GENERATORS)}")
    normalisation = normalisation or default_normalisation(generator)
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown --normalisation {normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
    if normalisation == "fixed" and generator != "bank":
        raise ValueError(f"--normalisation fixed is for the bank generator (its output is bounded), not {generator!r}")
    paths = DatasetPaths.of(root_path, dataset, list_dir)
    if not paths.vol_data.is_dir():
        raise FileNotFoundError(f"{paths.vol_data}: vol_data folder not found (run preprocess.py first)")
    cases = list_cases(paths)
    if not cases:
        raise ValueError(f"{paths.list_dir}: the vol_train/val/test lists name no case")
    wpath: Optional[Path] = Path(weights) if weights else None
    if wpath is not None and not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: weights file not found")
    if fit:
        if generator == "analytic":
            raise ValueError("--fit: the analytic generator has nothing to fit")
        train = read_list(paths.list_file("vol_train"))
        out = Path(checkpoint_dir) / dataset / f"{generator}_fit.pth"
        config = dataclasses.replace(fit_config or FitConfig(), normalisation=normalisation)
        wpath = fit_generator(paths, train, generator, out, config, init_weights=wpath, device=device,
                              overwrite=overwrite)
        if fit_only:
            return {}
    elif generator == "bank" and wpath is None:
        wpath = default_head_path()
        if not wpath.is_file():
            raise FileNotFoundError(f"{wpath}: shipped bank head not found (pass --weights or --fit)")
        log.info("bank head: %s (fitted on phantom data; fit your own on real data with --fit)", wpath)
    elif generator == "fpn" and wpath is None:
        raise ValueError("--generator fpn needs --weights FILE (the authors' "
                         "dice_best_Wavelet_square_net_vessel_data_size512.pth) or --fit")
    fitted_under = fitted_normalisation(wpath) if generator == "bank" and wpath is not None else None
    if fitted_under and fitted_under != normalisation:
        # the head learnt on planes standardised one way; maps of planes standardised the other
        # way are not what it was fitted to
        raise ValueError(f"{wpath}: this head was fitted under --normalisation {fitted_under}, and the maps would "
                         f"be made under {normalisation}: pass --normalisation {fitted_under}")
    return generate(paths, cases, generator, wpath, device=device, overwrite=overwrite,
                    max_batch_voxels=max_batch_voxels, normalisation=normalisation)


def fitted_normalisation(path: str | Path) -> Optional[str]:
    """The normalisation rule a head checkpoint written by :func:`fit_generator` was fitted under;
    None for other files (the shipped head, a bare state dict) that do not record one."""
    obj = load_torch_file(path, "head weights file")
    fit = obj.get("fit") if isinstance(obj, dict) else None
    return fit.get("normalisation") if isinstance(fit, dict) else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--root_path", default="data")
    p.add_argument("--list_dir", default="list")
    p.add_argument("--generator", choices=GENERATORS, default="bank")
    p.add_argument("--weights", default=None,
                   help="fpn: the authors' weights file; bank: a head checkpoint (default: the shipped "
                        "pretrained/bank_head_phantom.pth); with --fit: initial weights")
    p.add_argument("--fit", action="store_true", help="fit the generator on the training split first")
    p.add_argument("--fit_only", action="store_true", help="with --fit: stop after saving the checkpoint")
    p.add_argument("--iters", type=int, default=FitConfig.iters)
    p.add_argument("--lr", type=float, default=FitConfig.lr)
    p.add_argument("--batch", type=int, default=FitConfig.batch)
    p.add_argument("--patch", type=int, default=FitConfig.patch, help="side of the training plane patches (pixels)")
    p.add_argument("--seed", type=int, default=FitConfig.seed)
    p.add_argument("--checkpoint_dir", default="checkpoint/salience")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--max_batch_voxels", type=int, default=DEFAULT_MAX_BATCH_VOXELS,
                   help="pixels per batch of planes (memory bound)")
    p.add_argument("--normalisation", choices=NORMALISATIONS, default=None,
                   help="fixed: every plane standardised with the same constants and the bank head's output kept "
                        "as it is, so a voxel's salience does not depend on how far the scan extends (bank only); "
                        "volume: the paper's per-plane standardisation and min-max over the volume (default: "
                        f"{DEFAULT_NORMALISATION} for bank, volume for the others)")
    p.add_argument("--overwrite", action="store_true", help="redo complete outputs")
    return p


#: options that only the fitting (--fit) reads
FIT_OPTIONS = ("fit_only", "iters", "lr", "batch", "patch", "seed", "checkpoint_dir")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unused = given_options(parser, args, FIT_OPTIONS)
    if unused and not args.fit:
        parser.error(f"{', '.join(unused)} only apply with --fit (fitting the generator first)")
    if args.weights and args.generator == "analytic":
        parser.error("--weights: the analytic generator has no weights (its kernels are closed-form)")
    setup_logging()
    cfg = FitConfig(iters=args.iters, lr=args.lr, batch=args.batch, patch=args.patch, seed=args.seed)
    try:
        args.device = resolve_device(args.device)
        run(args.dataset, args.root_path, args.list_dir, args.generator, args.weights, args.fit, cfg,
            args.checkpoint_dir, args.device, args.overwrite, args.max_batch_voxels, args.fit_only,
            args.normalisation)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
