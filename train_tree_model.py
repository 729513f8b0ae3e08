"""Train a tree model: portal vein or hepatic veins for each voxel of a vessel mask (issue 26).

    python train_tree_model.py --data data phantom_trees list/phantom \
        [--data data/real ircadb_trees data/real/lists/all ...] --out checkpoint/tree_model/model.pth \
        [--splits train,val] [--iterations 800] [--grid_mm 3] [--seed 0] [--overwrite]

Each ``--data ROOT DATASET LIST_DIR`` names preprocessed data with a class map
(``preprocess.py --vessel_classes portalvein,venoussystem``); the cases of ``--splits`` of every
one are the training cases. A tree model takes any binary model's vessel mask and the image,
and labels each vessel voxel with its tree (inference/tree_model.py says how); ``predict.py`` and
``test.py`` take it with ``--tree_model``. It trains on the true masks: no vessel model is needed.

Writes the model file (format, configuration, weights, the training cases and their data
fingerprints) and ``<out>.json`` beside it (the same without the weights, and the losses); an
existing file is kept unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from utils.logging_setup import setup_logging

if TYPE_CHECKING:
    from inference.tree_model import TreeModelConfig

log = logging.getLogger("trees")


def read_cases(root: str, dataset: str, list_dir: str, splits: Sequence[str]) -> list:
    """The training cases (inference.tree_model.TreeCase) of ``splits`` of one preprocessed dataset
    with a class map; the label map is 1 portal, 2 hepatic whatever the stored class order. A case
    without vessels in its class map teaches nothing: it is left out with a warning naming its file."""
    from inference.tree_model import CLASSES, TreeCase
    from utils.h5io import DatasetPaths, read_list, read_volume
    from utils.manifests import dataset_class_values, volume_class_labels

    paths = DatasetPaths.of(root, dataset, list_dir)
    values = dataset_class_values(CLASSES, paths)
    cases = []
    for split in splits:
        for name in read_list(paths.list_file(f"vol_{split}")):
            vol = read_volume(paths.volume(name))
            labels = volume_class_labels(vol.classes, values, paths.volume(name))
            if not labels.any():
                log.warning("%s: no vessel in its class map: left out of the training", paths.volume(name))
                continue
            cases.append(TreeCase(f"{dataset}/{name}", vol.image, labels, tuple(vol.spacing)))
    return cases


def train_from_data(data: Sequence[Sequence[str]], out: str | Path, splits: Sequence[str], cfg: "TreeModelConfig",
                    device: str = "cpu",
                    overwrite: bool = False, progress: bool = True) -> Path:
    """Train on the cases of every ``(root, dataset, list_dir)`` in ``data`` and write the model
    file ``out`` and ``<out>.json``; returns ``out``."""
    from inference.tree_model import save_tree_model, train_tree_model
    from utils.atomic import atomic_path
    from utils.provenance import code_version

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    cases = [c for root, dataset, list_dir in data for c in read_cases(root, dataset, list_dir, splits)]
    if not cases:
        raise ValueError(f"no case with vessels in the {','.join(splits)} lists of {[d[1] for d in data]}")
    log.info("tree model: %d training cases, %d iterations, %.1f mm grid", len(cases), cfg.iterations, cfg.grid_mm)
    model, losses = train_tree_model(cases, cfg, device=device, progress=progress)
    info = {"cases": [c.name for c in cases], "data": [list(d) for d in data], "splits": list(splits),
            "code_version": code_version()}
    save_tree_model(out, model, info, overwrite=overwrite)
    side = {"config": asdict(cfg), "info": info, "losses": losses}
    with atomic_path(out.with_suffix(out.suffix + ".json"), overwrite=True) as tmp:
        tmp.write_text(json.dumps(side, indent=1))
    log.info("tree model: last loss %.4f (mean of the last 50 steps %.4f)", losses[-1],
             sum(losses[-50:]) / len(losses[-50:]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs=3, action="append", required=True, metavar=("ROOT", "DATASET", "LIST_DIR"),
                   help="preprocessed data with a class map (repeat for several datasets)")
    p.add_argument("--out", required=True, help="the tree model file to write")
    p.add_argument("--splits", default="train", help="comma-separated lists whose cases train (train, val)")
    p.add_argument("--iterations", type=int, default=800, help="training steps, one whole case each")
    p.add_argument("--grid_mm", type=float, default=3.0, help="mm per voxel the model sees")
    p.add_argument("--context_mm", type=float, default=30.0, help="around the vessel mask's bounding box")
    p.add_argument("--base_channels", type=int, default=8, help="width of the 3-D U-Net")
    p.add_argument("--coarse_rule", default="area", choices=("area", "sample"),
                   help="how the fine grid becomes the coarse one: area, each coarse voxel averages what it covers "
                        "(thin vessels stay in the mask); sample, linear sampling (tree models before 2026-12-07)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (poly decay)")
    p.add_argument("--seed", type=int, default=0, help="weights, case order and augmentation")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="cuda when present (auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    import torch

    from inference.tree_model import TreeModelConfig

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    try:
        cfg = TreeModelConfig(grid_mm=args.grid_mm, context_mm=args.context_mm, base_channels=args.base_channels,
                              iterations=args.iterations, lr=args.lr, seed=args.seed, coarse_rule=args.coarse_rule)
        out = train_from_data(args.data, args.out, args.splits.split(","), cfg, device=device,
                              overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tree model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
