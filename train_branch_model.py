"""Add branch networks to a tree model: which tree each branch of a binary model's mask belongs to.

    python train_branch_model.py --tree_model TREE.pth \
        --data ROOT DATASET PRED_DIR [--data ...] --out TREE_BRANCHES.pth \
        [--seeds 0-9] [--epochs 30] [--overwrite]

Each ``--data ROOT DATASET PRED_DIR`` names preprocessed data with a class map
(``preprocess.py --vessel_classes portalvein,venoussystem``) and a ``test.py`` report of a binary
model on it written with ``--save_pred h5 --pred_kind mask``: its ``predictions/<case>_pred.h5``
are the masks to learn from, every one of them a training case. The networks learn on the
binary model's masks, not the true ones, because the masks they will label break and join
where the true trees do not. For each case the tree model's logit is computed, the mask split
into its skeleton's branches, and each branch given the tree of most of its voxels
(``inference/branch_graph.py``).

Writes ``--out``: the tree model file with the branch networks in it (``predict.py`` and
``test.py --tree_model`` then use them), and ``<out>.json`` beside it (the configuration, the
cases and the losses); an existing file is kept unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from utils.logging_setup import setup_logging

log = logging.getLogger("trees")


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-9"`` or ``"0,3,7"`` as a tuple of ints; ValueError otherwise."""
    try:
        if "-" in text.strip("-"):
            lo, hi = text.split("-")
            seeds = tuple(range(int(lo), int(hi) + 1))
        else:
            seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds must be like 0-9 or 0,3,7, got {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds names no seed: {text!r}")
    return seeds


def read_training_graphs(tree_model, data: Sequence[Sequence[str]], progress: bool = True) -> tuple[list, list, list[str]]:
    """(graphs, truths, case names) of every prediction under each ``(root, dataset, pred_dir)``."""
    import h5py
    from tqdm import tqdm

    from inference.branch_graph import branch_graph, branch_truth
    from inference.tree_model import CLASSES
    from utils.h5io import DatasetPaths, read_volume
    from utils.manifests import dataset_class_values, volume_class_labels

    jobs = []
    for root, dataset, pred_dir in data:
        files = sorted(Path(pred_dir, "predictions").glob("*_pred.h5"))
        if not files:
            raise ValueError(f"{pred_dir}: no predictions/<case>_pred.h5 (test.py --save_pred h5 --pred_kind mask)")
        paths = DatasetPaths.of(root, dataset)
        values = dataset_class_values(CLASSES, paths)
        jobs += [(f, paths, values, dataset) for f in files]
    graphs, truths, names = [], [], []
    for f, paths, values, dataset in tqdm(jobs, desc="branch graphs", disable=not progress):
        case = f.name[:-len("_pred.h5")]
        with h5py.File(f, "r") as h:
            if "mask" not in h:
                raise ValueError(f"{f}: no 'mask' dataset (test.py --pred_kind mask)")
            union = h["mask"][()] > 0
        vol = read_volume(paths.volume(case))
        labels = volume_class_labels(vol.classes, values, paths.volume(case))
        if union.shape != vol.image.shape:
            raise ValueError(f"{f}: mask shape {union.shape} differs from {paths.volume(case)}'s {vol.image.shape}")
        if not union.any() or not labels.any():
            log.info("%s/%s: no vessel in the mask or the truth, skipped", dataset, case)
            continue
        logit = tree_model.network_logit(vol.image, union, vol.spacing)
        graph = branch_graph(union, logit, vol.spacing)
        graphs.append(graph)
        truths.append(branch_truth(graph, labels, vol.spacing))
        names.append(f"{dataset}/{case}")
    return graphs, truths, names


def vessel_models(data: Sequence[Sequence[str]]) -> list[str]:
    """The sha256 of the binary model whose masks each ``(root, dataset, pred_dir)`` holds, from its
    test.py report (``summary.json``; "" where the report does not say): the networks learnt that
    model's way of breaking and joining vessels."""
    shas = []
    for _, _, pred_dir in data:
        try:
            shas.append(str(json.loads(Path(pred_dir, "summary.json").read_text())["meta"]["model_sha256"]))
        except (OSError, ValueError, KeyError, TypeError):
            shas.append("")
    return shas


def train_branches(tree_model: str | Path, data: Sequence[Sequence[str]], out: str | Path,
                   config=None, overwrite: bool = False, progress: bool = True) -> Path:
    """Train branch networks (``config``: :class:`inference.branch_graph.BranchConfig`, default
    its defaults) for the tree model file ``tree_model`` on the predictions of ``data`` and write
    the tree model with them to ``out`` and ``<out>.json``; returns ``out``."""
    from inference.branch_graph import BranchConfig, train_branch_model
    from inference.tree_model import load_tree_model, save_tree_model
    from utils.atomic import atomic_path
    from utils.provenance import code_version

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    config = config or BranchConfig()
    model = load_tree_model(tree_model)
    graphs, truths, names = read_training_graphs(model, data, progress)
    log.info("branch networks: %d cases, %d branches, %d seeds x %d passes", len(graphs),
             sum(g.n for g in graphs), len(config.seeds), config.epochs)
    model.branches, losses = train_branch_model(graphs, truths, config, progress)
    info = dict(model.info)
    info["branches"] = {"cases": names, "data": [list(d) for d in data], "tree_model": str(tree_model),
                        "tree_model_sha256": model.sha256, "vessel_model_sha256": vessel_models(data),
                        "code_version": code_version()}
    save_tree_model(out, model, info, overwrite=overwrite)
    side = {"config": asdict(config), "info": info["branches"], "last_pass_losses": losses}
    with atomic_path(out.with_suffix(out.suffix + ".json"), overwrite=True) as tmp:
        tmp.write_text(json.dumps(side, indent=1))
    log.info("branch networks: mean loss of the last pass %.4f (seeds %s)", sum(losses) / len(losses),
             ", ".join(f"{x:.3f}" for x in losses))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree_model", required=True, help="the tree model file (train_tree_model.py)")
    p.add_argument("--data", nargs=3, action="append", required=True, metavar=("ROOT", "DATASET", "PRED_DIR"),
                   help="preprocessed data with a class map and a test.py report on it with --save_pred h5 "
                        "--pred_kind mask (repeatable)")
    p.add_argument("--out", required=True, help="the tree model file to write, with the branch networks")
    p.add_argument("--seeds", default="0-9", help="one network per seed, their logits averaged (0-9, or 0,3,7)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training masks per network")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from inference.branch_graph import BranchConfig
    try:
        config = BranchConfig(epochs=args.epochs, seeds=parse_seeds(args.seeds))
        out = train_branches(args.tree_model, args.data, args.out, config, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError, OSError) as e:
        log.error("%s", e)
        return 2
    print(f"tree model with branch networks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
