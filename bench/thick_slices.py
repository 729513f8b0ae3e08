"""What does a 2-D offline-salience model lose on thicker slices, and is it the salience's grid?

    python bench/thick_slices.py --model RUN/best_model.pth --root_path data/s2r --dataset 3D-IRCADb \
        --list_dir LISTS [--split test] [--factor 2] [--work DIR]

Training data and real scans rarely share a slice thickness (the demo phantoms have 1.6 mm,
3D-IRCADb 1-4 mm). The offline salience is computed on the scan's own voxel grid
(docs/DESIGN.md: every coronal and sagittal plane of V), so on a thick scan its coronal and
sagittal planes see vessels squashed along z. For every case of the split (a ``vol_data``
file with a liver mask) this makes a thick copy by averaging ``--factor`` consecutive slices
(label and liver kept where at least half of the group is labelled) and scores the model
inside the liver on:

- ``native``: the case as stored, salience from its own grid;
- ``thick``: the thick copy, salience from its own grid (what ``predict.py`` does on such a scan);
- ``thick, salience on an interpolated fine grid``: the thick image linearly interpolated
  back to the stored slice spacing, salience computed there, then averaged back over the
  same groups (what a resampling step before the salience could do on a real thick scan);
- ``thick, oracle salience``: the stored scan's salience averaged over the groups (not
  available for a real thick scan: the most any choice of salience grid could recover).

The salience comes from the model file's own generator (``--head`` replaces it). Nothing is
written outside ``--work`` (a new folder; default: a temporary one, removed at the end).
"""
from __future__ import annotations

import argparse
import logging
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.records import run_recorded  # noqa: E402

from evaluation.runner import run_evaluation  # noqa: E402
from networks.checkpoint import generator_from_checkpoint, load_checkpoint  # noqa: E402
from networks.salience import salience_3d  # noqa: E402
from preprocessing.thickness import group_mean, interpolate_slices, thicken  # noqa: E402
from utils.h5io import DatasetPaths, Volume, read_list, read_volume, write_list, write_salience, write_volume  # noqa: E402
from utils.logging_setup import setup_logging  # noqa: E402

log = logging.getLogger("thick_slices")

VARIANTS = ("native", "thick", "thick, salience on an interpolated fine grid", "thick, oracle salience")


def _write_case(root: Path, dataset: str, case: str, vol: Volume, sal: np.ndarray, generator: Any) -> None:
    paths = DatasetPaths.of(root, dataset, root / "lists")
    paths.vol_data.mkdir(parents=True, exist_ok=True)
    paths.vol_salience.mkdir(parents=True, exist_ok=True)
    write_volume(paths.volume(case), vol)
    write_salience(paths.salience(case), sal.astype(np.float32), generator=generator.name,
                   weights_sha256=generator.weights_sha256, normalisation=generator.normalisation)


def run(model: Path, root_path: Path, dataset: str, list_dir: Path, split: str, factor: int,
        work: Optional[Path], head: Optional[Path], device: str) -> dict[str, list[dict]]:
    """Score ``model`` on the four VARIANTS of every case of ``split``; returns variant -> per-case rows."""
    ckpt = load_checkpoint(model)
    if ckpt.get("salience") != "offline":
        raise ValueError(f"{model}: salience {ckpt.get('salience')!r}; this bench compares offline salience grids")
    generator = generator_from_checkpoint(ckpt, model, head)
    if work is not None and work.exists() and any(work.iterdir()):
        raise ValueError(f"{work}: --work is not empty; give a new folder (its variants would be overwritten)")
    src = DatasetPaths.of(root_path, dataset, list_dir)
    cases = read_list(src.list_file(f"vol_{split}"))
    tmp = Path(tempfile.mkdtemp(prefix="thick_slices_")) if work is None else work
    roots = {v: tmp / f"variant{i}" for i, v in enumerate(VARIANTS)}
    try:
        for case in cases:
            vol = read_volume(src.volume(case))
            if vol.liver is None:
                raise ValueError(f"{src.volume(case)}: no liver mask; the scores are taken inside the liver")
            log.info("%s: %s voxels, %.2f mm slices -> %.2f mm", case, vol.image.shape, vol.spacing[2],
                     vol.spacing[2] * factor)
            fine_sal = salience_3d(vol.image, generator, device=device)
            thick = thicken(vol, factor)
            interp_sal = group_mean(salience_3d(interpolate_slices(thick.image, factor), generator, device=device),
                                    factor)
            maps = {VARIANTS[0]: (vol, fine_sal),
                    VARIANTS[1]: (thick, salience_3d(thick.image, generator, device=device)),
                    VARIANTS[2]: (thick, interp_sal),
                    VARIANTS[3]: (thick, group_mean(fine_sal, factor))}
            for variant, (v, s) in maps.items():
                _write_case(roots[variant], dataset, case, v, s, generator)
        results = {}
        for variant, root in roots.items():
            lists = root / "lists" / dataset
            lists.mkdir(parents=True, exist_ok=True)
            write_list(lists / f"vol_{split}.txt", cases)
            res = run_evaluation(dataset=dataset, root_path=root, list_dir=root / "lists", model_path=model,
                                 split=split, eval_roi="liver", device=device, output=root / "eval", overwrite=True)
            results[variant] = res.rows
        return results
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)


def table(results: dict[str, list[dict]]) -> str:
    cases = [r["case"] for r in next(iter(results.values()))]
    head = "| variant | " + " | ".join(f"Dice {c}" for c in cases) + " | Dice mean | clDice mean | CL recall <1 mm | components pred/true |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for variant, rows in results.items():
        def mean(key: str) -> float:
            return float(np.nanmean([float(r[key]) for r in rows]))

        lines.append(f"| {variant} | " + " | ".join(f"{r['dice']:.3f}" for r in rows)
                     + f" | {mean('dice'):.3f} | {mean('cldice'):.3f} | {mean('cl_recall_lt1'):.3f}"
                     + f" | {mean('components_ratio'):.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="an offline-salience model file (best_model.pth)")
    p.add_argument("--root_path", required=True, type=Path)
    p.add_argument("--dataset", default="3D-IRCADb")
    p.add_argument("--list_dir", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--factor", type=int, default=2, help="slices averaged into one (default 2: 1.6 -> 3.2 mm)")
    p.add_argument("--work", type=Path, default=None, help="keep the variants' data and reports in this new folder")
    p.add_argument("--head", type=Path, default=None, help="salience generator weights replacing the model file's")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    setup_logging()
    try:
        results = run(args.model, args.root_path, args.dataset, args.list_dir, args.split, args.factor,
                      args.work, args.head, args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{platform.node()}, {platform.processor() or platform.machine()}; model {args.model}; "
          f"slices x{args.factor}; scores inside the liver\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_recorded(main, "the model on thicker slices: Dice and clDice per variant"))
