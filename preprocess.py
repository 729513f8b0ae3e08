"""Convert raw CT patients to the project's HDF5 layout (docs/DESIGN.md section 2).

    python preprocess.py --dataset 3D-IRCADb --src /path/to/3Dircadb1
    python preprocess.py --dataset phantom --src data/raw/phantom
    python preprocess.py --dataset msd_hv --format nifti --images imagesTr --labels labelsTr

The work is done by ``preprocessing.preprocess``; this file only parses arguments. Exit code 1
when any patient failed (each failure is one logged line naming the patient and the file).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from preprocessing.pipeline import CROP_MODES, DEFAULT_VESSELS, FORMATS, parse_split, preprocess
from utils.cli import given_options
from utils.logging_setup import setup_logging

log = logging.getLogger("preprocess")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset name: 3D-IRCADb, phantom or any other")
    p.add_argument("--src", help="folder of 3Dircadb1.<n> patient folders (--format dicom)")
    p.add_argument("--root_path", default="data", help="output root: <root_path>/<dataset>/vol_data ...")
    p.add_argument("--list_dir", default="list", help="lists go to <list_dir>/<dataset>/")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="dicom")
    p.add_argument("--images", help="NIfTI images folder (--format nifti)")
    p.add_argument("--labels", help="NIfTI labels folder (--format nifti), same file names as the images")
    p.add_argument("--label-values", default=None,
                   help="NIfTI label values that mean vessel, comma separated (default: 1 for {0,1,2} "
                        "MSD labels, 255 for 0/255 masks)")
    p.add_argument("--vessels", default=",".join(DEFAULT_VESSELS),
                   help="mask folders whose union is the label (venacava = venoussystem); with --format nifti, "
                        "'liver' names the label files' label the liver (data for a liver model)")
    p.add_argument("--vessel_classes", default="",
                   help="also store a class map beside the binary label: these mask folders, in label order "
                        "(e.g. portalvein,venoussystem: 1 portal vein, 2 hepatic veins; a voxel both claim goes to "
                        "the first); DICOM only")
    p.add_argument("--no-masks", dest="with_masks", action="store_false",
                   help="image only: label all zeros, no liver mask, no liver crop")
    p.add_argument("--crop", choices=CROP_MODES, default="liver_z")
    p.add_argument("--margin", type=int, default=0, help="voxels added around the liver crop")
    p.add_argument("--workers", type=int, default=1, help="patients converted in parallel processes")
    p.add_argument("--overwrite", action="store_true", help="redo complete outputs and rewrite existing lists")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split for datasets without lists")
    p.add_argument("--split", default="60/20/20", help="train/val/test proportions for a new split")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # options the chosen format or crop does not read: refused, not silently dropped
    given = given_options(parser, args, ("images", "labels", "label_values") if args.fmt == "dicom"
                          else ("src",) if args.vessels.strip().lower() == "liver" else ("src", "vessels"))
    if given:
        parser.error(f"{', '.join(given)} {'do' if len(given) > 1 else 'does'} not apply to --format {args.fmt}")
    if args.margin and args.crop == "none":
        parser.error("--margin widens the liver crop; --crop none keeps the whole scan")
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        label_values = None if args.label_values is None else [int(v) for v in args.label_values.split(",") if v]
        summary = preprocess(
            args.dataset, args.src, args.root_path, args.list_dir,
            fmt=args.fmt, images=args.images, labels=args.labels,
            vessels=[v for v in args.vessels.split(",") if v.strip()], with_masks=args.with_masks,
            crop=args.crop, margin=args.margin, workers=args.workers, overwrite=args.overwrite,
            split_seed=args.split_seed, split=parse_split(args.split), label_values=label_values,
            vessel_classes=[c for c in args.vessel_classes.split(",") if c.strip()],
        )
    except (OSError, ValueError) as e:
        log.error("%s", " ".join(str(e).split()))
        return 2
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
