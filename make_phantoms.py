"""Write synthetic 3D-IRCADb-style patients (DICOM + vessel masks + centreline JSON).

    python make_phantoms.py --out data/raw/phantom --cases 12 --preset demo --seed 0 [--workers 2] [--zip]

The work is done by :func:`phantom.generator.make_phantoms`; this script only parses
arguments. Bad input (unknown preset, --cases <= 0, an output folder that exists and
is not empty without --overwrite, one that cannot be written) gives a one-line error
and exit code 2, with nothing written.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from phantom.generator import LABEL_RIM_MM, PRESETS, make_phantoms
from utils.logging_setup import setup_logging

log = logging.getLogger("make_phantoms")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="make_phantoms.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (patients 3Dircadb1.<n> go inside)")
    p.add_argument("--cases", type=int, default=12, help="number of patients (default 12)")
    p.add_argument("--preset", default="demo", help=f"one of {', '.join(PRESETS)} (default demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same patients (default 0)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1; output does not depend on it)")
    p.add_argument("--zip", action="store_true", help="nested PATIENT_DICOM.zip / MASKS_DICOM.zip, as some downloads")
    p.add_argument("--overwrite", action="store_true", help="replace patients in a non-empty --out")
    p.add_argument("--label_rim", type=float, default=LABEL_RIM_MM,
                   help=f"vessel labels reach hypot(r, RIM) mm from the centreline, like an annotator's "
                        f"(default {LABEL_RIM_MM}; 0: the exact lumen, the phantoms before 2026-12-05)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        make_phantoms(args.out, args.cases, args.preset, args.seed, workers=args.workers,
                      zip_output=args.zip, overwrite=args.overwrite, label_rim=args.label_rim)
    except ValueError as e:
        print(f"make_phantoms.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
