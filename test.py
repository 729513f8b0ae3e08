"""Evaluate a trained model on a split (docs/DESIGN.md section 4).

    python test.py --dataset 3D-IRCADb --backbone unet [--exp NAME] [--salience MODE] [--model_path FILE] [--split test]
                   [--eval_roi liver|none] [--tta] [--overlap 0.5] [--img_size H W]
                   [--save_pred h5|nifti] [--figures] [--device auto] [--output DIR]
                   [--min_component_mm3 MM3] [--tree_model FILE [--tree_smoothness W]] [--overwrite]

The model is rebuilt from its checkpoint alone (networks.checkpoint.load_model); by default
the one ``best_model.pth`` under ``checkpoint/<dataset>/<backbone>/`` whose run matches
``--exp`` and ``--salience`` (an error lists the candidates when several match). Every case
of ``<list_dir>/<dataset>/vol_<split>.txt`` is predicted at the stored grid
(inference.predict_volume; a checkpoint trained with ``--target_spacing`` resamples each case
to its millimetres per pixel and maps the prediction back, with a warning for a case more
than 20% off), thresholded and post-processed with inference.vessel_mask and scored
(evaluation.metrics.evaluate_case).
Reports go to one folder (default ``<run folder>/eval_<split>[_roi-liver][_tta]``), written
as a whole when every case is done: per_case.csv, summary.json, results.md, and optionally
predictions/ and figures/. An existing complete report is kept only when it was made by the same
model file (sha256), options, input files and code version (summary.json's meta.provenance);
otherwise it is computed again, and the log says what differed. --overwrite always recomputes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from evaluation.predictions import PRED_FORMATS
from evaluation.reports import WRONG_TREE, console_table, tree_columns
from evaluation.runner import ROI_CHOICES, run_evaluation
from utils.cli import add_tree_smoothness, given_options, refuse_smoothness_alone
from utils.logging_setup import setup_logging

log = logging.getLogger("test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--root_path", default="data")
    p.add_argument("--list_dir", default="list")
    p.add_argument("--backbone", default=None, help="registry name; must match the checkpoint's")
    p.add_argument("--model_path", default=None,
                   help="default: the best_model.pth under checkpoint/<dataset>/<backbone>/ matching --exp/--salience")
    p.add_argument("--exp", default=None, help="choose the run by its experiment name (run folder)")
    p.add_argument("--salience", default=None, choices=("offline", "e2e", "none"),
                   help="choose the run by salience mode (and check the checkpoint's)")
    p.add_argument("--checkpoint_root", default="checkpoint")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (3-D)")
    p.add_argument("--tta", action="store_true", help="average over flips")
    p.add_argument("--img_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="2-D input size (default: the checkpoint's)")
    p.add_argument("--eval_roi", choices=ROI_CHOICES, default="none", help="score only inside the liver mask")
    p.add_argument("--save_pred", choices=PRED_FORMATS, default=None)
    p.add_argument("--pred_kind", choices=("prob", "mask"), default="prob", help="what --save_pred writes")
    p.add_argument("--figures", action="store_true", help="PNG overlays and MIPs per case")
    p.add_argument("--graph", action="store_true",
                   help="branch graphs of prediction and truth (graphs/*.graphml) and graph scores per case: branch "
                        "points found within 3 mm, branches found by radius, pieces of the largest true tree")
    p.add_argument("--tree_model", default=None, metavar="FILE",
                   help="a tree model (train_tree_model.py) that labels this binary model's mask with its trees: "
                        "every metric per tree and the share of found vessel voxels given the other tree")
    add_tree_smoothness(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch_size", type=int, default=8, help="slices (2-D) or windows (3-D) per forward pass; default %(default)d")
    p.add_argument("--output", default=None, help="report folder (default: eval_<split>... in the run folder)")
    p.add_argument("--min_component_mm3", type=float, default=None, metavar="MM3",
                   help="drop predicted components smaller than MM3 mm^3 before scoring (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # options that choose or write nothing in this command line: refused, not silently dropped
    if args.model_path and given_options(parser, args, ("exp", "checkpoint_root")):
        parser.error("--exp and --checkpoint_root choose a run folder; --model_path names the model file itself")
    if given_options(parser, args, ("pred_kind",)) and not args.save_pred:
        parser.error("--pred_kind says what --save_pred writes; give --save_pred")
    refuse_smoothness_alone(parser, args)
    setup_logging()
    try:
        res = run_evaluation(
            dataset=args.dataset, backbone=args.backbone, root_path=args.root_path, list_dir=args.list_dir,
            model_path=args.model_path, checkpoint_root=args.checkpoint_root, exp=args.exp,
            salience=args.salience, split=args.split,
            overlap=args.overlap, tta=args.tta, img_size=args.img_size, eval_roi=args.eval_roi,
            save_pred=args.save_pred, pred_kind=args.pred_kind, figures=args.figures, device=args.device,
            batch_size=args.batch_size, output=args.output, overwrite=args.overwrite,
            min_component_mm3=args.min_component_mm3, graph=args.graph, tree_model=args.tree_model,
            tree_smoothness=args.tree_smoothness,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        log.error("%s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 1
    print(console_table(res.rows, res.summary))
    if res.classes:
        print(f"\nper tree (wrong tree: {WRONG_TREE}):")
        print(console_table(res.rows, res.summary, tree_columns(res.classes)))
    print(f"report: {res.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
