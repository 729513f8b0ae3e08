"""Draw the README's method figure from a phantom case: image, the three salience planes,
the gated input, the prediction and the truth, on one transverse slice.

    python scripts/draw_method_figure.py --model_path checkpoint/.../best_model.pth --out imgs/method_phantom.png

Reads the stored volume and salience of ``--case`` (default: the first test case), runs the
model on the whole volume with inference.predict_volume and draws the slice with the most
vessel voxels.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders.inputs import model_input  # noqa: E402
from evaluation.figures import PLANE_NAMES, error_rgb  # noqa: E402
from inference import binarize, predict_volume  # noqa: E402
from networks.checkpoint import context_of, load_model  # noqa: E402
from utils.atomic import atomic_path  # noqa: E402
from utils.h5io import DatasetPaths, read_list, read_salience, read_volume  # noqa: E402
from utils.logging_setup import setup_logging  # noqa: E402

log = logging.getLogger("draw_method_figure")


def draw_method_figure(
    model_path: Path, out: Path, dataset: str = "phantom", root_path: str = "data", list_dir: str = "list",
    case: Optional[str] = None,
) -> Path:
    """Write the figure to ``out`` (PNG, atomically) and return its path."""
    paths = DatasetPaths.of(root_path, dataset, list_dir)
    case = case or read_list(paths.list_file("vol_test"))[0]
    vol = read_volume(paths.volume(case))
    sal = read_salience(paths.salience(case))
    model, ckpt = load_model(model_path)
    prob = predict_volume(model, vol.image, sal if ckpt["salience"] == "offline" else None,
                          salience_mode=ckpt["salience"], spatial_dims=ckpt["spatial_dims"],
                          img_size=ckpt.get("img_size"), patch_size=ckpt.get("patch_size"),
                          target_spacing=ckpt.get("target_spacing"), spacing=vol.spacing,
                          context=context_of(ckpt.get("config")))
    z = int(vol.label.reshape(-1, vol.label.shape[2]).sum(axis=0).argmax())
    gated = model_input(vol.image[:, :, z], sal[:, :, :, z], "offline")
    pred, truth = binarize(prob[:, :, z]).astype(bool), vol.label[:, :, z].astype(bool)
    panels = [("CT image G", vol.image[:, :, z], "gray")]
    panels += [(f"salience S ({name})", sal[i, :, :, z], "magma") for i, name in enumerate(PLANE_NAMES)]
    panels += [("gated input G + G S_t", gated[0], "gray"), ("prediction", prob[:, :, z], "gray")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.1 * (len(panels) + 1), 3.4))
    for ax, (title, img, cmap) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, vmin=0, vmax=float(max(img.max(), 1e-6)) if cmap == "gray" else 1)
        ax.set_title(title, fontsize=9)
    axes[-1].imshow(error_rgb(vol.image[:, :, z], pred, truth))
    axes[-1].set_title("TP green / FP red / FN blue", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{dataset} {case}, slice {z}: {ckpt['model_name']} with {ckpt['salience']} salience", fontsize=10)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    log.info("wrote %s", out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, type=Path)
    p.add_argument("--out", default=Path("imgs/method_phantom.png"), type=Path)
    p.add_argument("--dataset", default="phantom")
    p.add_argument("--root_path", default="data")
    p.add_argument("--list_dir", default="list")
    p.add_argument("--case", default=None)
    args = p.parse_args(argv)
    setup_logging()
    try:
        draw_method_figure(args.model_path, args.out, args.dataset, args.root_path, args.list_dir, args.case)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
