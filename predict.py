"""Segment the liver vessels of new CT scans with one model file (docs/DESIGN.md section 6).

    python predict.py --model FILE --input PATH --output DIR [--device auto]
                      [--liver_model FILE [--liver_margin 5] [--liver_refine 1] | --liver_mask FILE | --no_liver_model]
                      [--prob] [--mesh [stl|obj]] [--figures] [--graph] [--dicom_seg] [--tta] [--series UID]
                      [--tree_model FILE [--tree_smoothness 8]] [--head FILE]
                      [--batch_size 8] [--min_component_mm3 MM3] [--overwrite]

PATH: a DICOM series folder, a zip of one (3D-IRCADb's PATIENT_DICOM.zip), a 3D-IRCADb patient
folder, a .nii / .nii.gz file, or a folder of several of those (one output set each). Writes
``<case>_vessels.nii.gz`` (uint8, in the input's exact geometry) and ``<case>_stats.json``;
``--prob`` adds ``<case>_prob.nii.gz``, ``--mesh`` ``<case>_vessels.stl`` (or .obj) in patient
millimetres, ``--figures`` ``<case>_mip.png`` and ``<case>_3d.png``, ``--graph``
``<case>_graph.graphml`` and ``<case>_graph.vtp`` (the branch graph), ``--dicom_seg``
``<case>_seg.dcm`` (a DICOM Segmentation referencing the source series), ``--liver_model``
``<case>_liver.nii.gz`` (the liver it found, its surface corrected by the scan's parenchyma
intensity unless ``--liver_refine 0``; vessels farther than ``--liver_margin`` mm from it
are removed; a model file with a liver model embedded by ``scripts/embed_liver.py`` does the same
without ``--liver_model``, unless ``--no_liver_model``), ``--tree_model`` (with a binary model)
``<case>_trees.nii.gz`` (1 portal vein, 2 hepatic veins; its decision moved to where the mask
is narrow by a minimum cut of weight ``--tree_smoothness``) and, with ``--mesh``, a surface per tree.
The model file carries
everything else (network, salience generator, HU window, resize rule, threshold, smallest component kept); ``--head``
supplies the generator weights for checkpoints that do not embed them.
Bad input: a one-line error naming the file, exit code 1, no output for that scan.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from inference.liver import DEFAULT_MARGIN_MM
from prediction.segment import MESH_FORMATS, run_predict
from preprocessing.errors import PreprocessError
from utils.cli import add_tree_smoothness, refuse_smoothness_alone
from utils.logging_setup import setup_logging

log = logging.getLogger("predict")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (best_model.pth written by main.py)")
    p.add_argument("--input", required=True, help="DICOM folder, zip, .nii/.nii.gz, or a folder of several")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--liver_mask", default=None,
                   help="NIfTI file, DICOM mask folder, or a folder or zip of mask folders (its 'liver' one, as in "
                        "3D-IRCADb's MASKS_DICOM): keep vessels inside it (overrides --liver_model)")
    p.add_argument("--liver_model", default=None,
                   help="liver model file (scripts/train_liver.sh): segment the liver first, keep vessels near it "
                        "and write <case>_liver.nii.gz")
    p.add_argument("--no_liver_model", action="store_true",
                   help="ignore a liver model embedded in --model (scripts/embed_liver.py): the whole scan")
    p.add_argument("--liver_margin", type=float, default=DEFAULT_MARGIN_MM, metavar="MM",
                   help="with --liver_model: keep vessels up to MM mm outside the liver (the hilum; default %(default)g)")
    p.add_argument("--liver_refine", type=int, choices=(0, 1), default=1,
                   help="with a liver model (--liver_model or one embedded in --model): correct the liver's "
                        "surface by the scan's own parenchyma intensity (1, default) or keep the model's mask (0)")
    p.add_argument("--tree_model", default=None, metavar="FILE",
                   help="a tree model (train_tree_model.py): label a binary model's vessels portal vein (1) or "
                        "hepatic veins (2): <case>_trees.nii.gz, a surface and statistics per tree")
    add_tree_smoothness(p)
    p.add_argument("--prob", action="store_true", help="also write the probability map")
    p.add_argument("--mesh", nargs="?", const="stl", choices=MESH_FORMATS, default=None,
                   help="also write the vessel surface (default stl)")
    p.add_argument("--figures", action="store_true", help="MIPs with the vessels overlaid and a 3-D rendering")
    p.add_argument("--dicom_seg", action="store_true",
                   help="also write <case>_seg.dcm, a DICOM Segmentation of the mask referencing the source series "
                        "(for a PACS, OHIF or 3D Slicer's DICOM browser); DICOM input only")
    p.add_argument("--graph", action="store_true",
                   help="also write the branch graph: <case>_graph.graphml (networkx; nodes and branches with length "
                        "and radius in mm) and <case>_graph.vtp (polylines with the radius, for 3D Slicer / ParaView)")
    p.add_argument("--tta", action="store_true", help="average over flips")
    p.add_argument("--series", default=None, help="SeriesInstanceUID to use when a folder mixes several series")
    p.add_argument("--head", default=None, help="salience generator weights for a model file that lacks them")
    p.add_argument("--batch_size", type=int, default=8, help="slices (2-D) or windows (3-D) per forward pass; default %(default)d")
    p.add_argument("--min_component_mm3", type=float, default=None, metavar="MM3",
                   help="drop predicted components smaller than MM3 mm^3 (default: the model file's setting)")
    p.add_argument("--overwrite", action="store_true", help="redo scans whose outputs exist")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_liver_model and args.liver_model:
        parser.error("--no_liver_model ignores a liver model embedded in --model; it does not go with --liver_model")
    refuse_smoothness_alone(parser, args)
    setup_logging()
    try:
        results = run_predict(args.model, args.input, args.output, device=args.device, head=args.head,
                              liver_mask=args.liver_mask, liver_model=args.liver_model,
                              liver_margin_mm=args.liver_margin, liver_refine=bool(args.liver_refine),
                              use_embedded_liver=not args.no_liver_model,
                              prob=args.prob, mesh=args.mesh, figures=args.figures,
                              graph=args.graph, dicom_seg=args.dicom_seg,
                              tta=args.tta, series=args.series, batch_size=args.batch_size, overwrite=args.overwrite,
                              min_component_mm3=args.min_component_mm3, tree_model=args.tree_model,
                              tree_smoothness=args.tree_smoothness)
    except (PreprocessError, FileNotFoundError, FileExistsError, ValueError, OSError, RuntimeError) as e:
        log.error("%s", " ".join(str(e).split()) or type(e).__name__)
        log.debug("predict.py failed", exc_info=True)
        return 1
    for r in results:
        if r.status == "failed":
            continue
        s = r.stats
        extra = (f": {s['vessel_volume_ml']:.2f} mL, centreline {s['centreline_length_mm']:.0f} mm, "
                 f"{s['connected_components']} components") if s else " (kept)"
        print(f"{r.case}{extra}")
        for f in r.files:
            print(f"  {f}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
