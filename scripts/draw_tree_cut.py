"""Draw what the minimum cut does to a tree model's labels, on one case of a test.py report.

    python scripts/draw_tree_cut.py --report REPORT_DIR --root_path data/trees --dataset ho10 \
        --list_dir data/trees/lists --case case0005 --out imgs/tree_cut.png

``REPORT_DIR``: a ``test.py --tree_model ... --save_pred h5 --pred_kind mask`` report; its saved
label map is the cut (``inference.trees.cut_trees``, the report's smoothness). The tree model
named in the report labels the same mask again voxel by voxel (smoothness 0). Coronal maximum
intensity projections of the mask: the true tree of each found vessel voxel (grey: predicted
where there is no vessel), the tree model voxel by voxel, with branch networks in its file also
their labels branch by branch (:func:`uncut_labels`), and the cut; portal red,
hepatic blue; each titled with its share of found voxels in the wrong tree
(``evaluation.metrics.wrong_tree_share``). The image lies under the projections.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.figures import _save, plt  # noqa: E402
from evaluation.metrics import wrong_tree_share  # noqa: E402
from inference.tree_model import CLASSES  # noqa: E402
from inference.trees import cut_trees  # noqa: E402
from prediction.segment import TREE_COLOURS  # noqa: E402
from utils.boxes import bounding_box  # noqa: E402
from utils.h5io import DatasetPaths, read_volume  # noqa: E402
from utils.manifests import class_labels, dataset_class_values  # noqa: E402

#: the colour of predicted voxels that are no vessel, in the truth panel
FALSE_POSITIVE = (0.6, 0.6, 0.6)


def coronal_rgb(image: np.ndarray, labels: np.ndarray, colours: dict[int, tuple]) -> np.ndarray:
    """(D, W, 3) coronal MIP of ``image`` (H, W, D) in [0, 1] with each label value of ``labels``
    painted in its colour where it projects; the slice axis runs down the picture, reversed, so
    the last slice is at the top."""
    g = image.max(axis=0).T[::-1]
    rgb = np.repeat(((g - g.min()) / max(float(np.ptp(g)), 1e-6))[..., None], 3, axis=2)
    for value, colour in colours.items():
        m = (labels == value).max(axis=0).T[::-1]
        rgb[m] = 0.25 * rgb[m] + 0.75 * np.asarray(colour)
    return rgb


def draw_tree_cut(report: Path, root_path: str, dataset: str, list_dir: str, case: str, out: Path,
                  tree_model: Optional[object] = None) -> Path:
    """Write the figure (module docstring) to ``out``; ``tree_model``: a loaded tree model to use
    instead of the report's file."""
    meta = json.loads((Path(report) / "summary.json").read_text())["meta"]
    if not meta.get("tree_model"):
        raise ValueError(f"{report}: not a report of a tree model (test.py --tree_model)")
    pred = Path(report) / "predictions" / f"{case}_pred.h5"
    if not pred.is_file():
        raise ValueError(f"{pred}: not found (run test.py with --save_pred h5 --pred_kind mask)")
    with h5py.File(pred, "r") as f:
        cut = f["mask"][:]
    paths = DatasetPaths.of(root_path, dataset, list_dir)
    vol = read_volume(paths.volume(case))
    if vol.classes is None:
        raise ValueError(f"{paths.volume(case)}: no class map (preprocess.py --vessel_classes)")
    true_labels = class_labels(vol.classes, dataset_class_values(CLASSES, paths))  # 1 portal, 2 hepatic
    if cut.shape != vol.image.shape:
        raise ValueError(f"{pred}: shape {cut.shape}, the volume's is {vol.image.shape}")
    if tree_model is None:
        from inference.tree_model import load_tree_model

        tree_model = load_tree_model(meta["tree_model"]["path"])
    union = cut > 0
    truth = np.where(union, np.where(true_labels > 0, true_labels, 3), 0)
    colours = {1: TREE_COLOURS[0], 2: TREE_COLOURS[1]}
    roi = vol.liver if meta.get("eval_roi") == "liver" else None
    # grey first: the trees are painted over it
    panels = [("truth of the found voxels\n(grey: no vessel)", truth, {3: FALSE_POSITIVE, **colours})]
    before = uncut_labels(tree_model, vol.image, union, vol.spacing)
    for name, lab in before + [(f"minimum cut, smoothness {meta['tree_model'].get('smoothness', 0):g}", cut)]:
        panels.append((f"{name}:\n{wrong_tree_share(lab, true_labels, roi):.1%} in the wrong tree", lab, colours))
    # the mask's box (a few voxels wider): the projections hold the vessels, not the bones around them
    box = bounding_box(union, margin=(2, 6, 2))
    if box is None:
        raise ValueError(f"{pred}: the mask is empty")
    aspect = float(vol.spacing[2]) / float(vol.spacing[1])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.0), squeeze=False)
    for ax, (title, lab, cols) in zip(axes[0], panels):
        ax.imshow(coronal_rgb(vol.image[box], lab[box], cols), aspect=aspect, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{dataset}/{case}, coronal MIPs: portal vein red, hepatic veins blue", fontsize=10)
    _save(fig, Path(out))
    return Path(out)


def uncut_labels(tree_model, image: np.ndarray, union: np.ndarray,
                 spacing: Sequence[float]) -> list[tuple[str, np.ndarray]]:
    """(title, label map uint8 (H, W, D): 1 portal, 2 hepatic) of the labels before the cut: the
    tree model's voxel by voxel; with branch networks in its file, also theirs, one per branch."""
    # the network runs once: the branch networks take its logit (as TreeModel.hepatic_minus_portal)
    logit = tree_model.network_logit(image, union, spacing)
    alone = cut_trees(union, logit, spacing, 0.0)
    if tree_model.branches is None:
        return [("tree model, voxel by voxel", alone)]
    per_branch = cut_trees(union, tree_model.branches.voxel_logit(union, logit, spacing), spacing, 0.0)
    return [("tree model alone, voxel by voxel", alone), ("branch networks, branch by branch", per_branch)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", required=True, type=Path, help="test.py report with --tree_model and saved masks")
    p.add_argument("--root_path", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--list_dir", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--out", required=True, type=Path, help="the PNG to write")
    a = p.parse_args(argv)
    try:
        print(draw_tree_cut(a.report, a.root_path, a.dataset, a.list_dir, a.case, a.out))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
