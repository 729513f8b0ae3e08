"""One model file for a new scan: a vessel model with its liver model embedded.

    python scripts/embed_liver.py --model VESSELS.pth --liver_model LIVER.pth --out VESSELS_LIVER.pth

``predict.py --model VESSELS_LIVER.pth`` then segments the liver first and keeps the vessels near
it, as ``--liver_model LIVER.pth`` would (``--liver_model`` given anyway replaces the embedded
one; ``--no_liver_model`` ignores it). The vessel model's weights and settings are unchanged;
the liver model keeps its own (its resolution, HU window, threshold) and its file's sha256, which
predict.py's provenance records. Both files are checked first: a liver model given as
``--model`` or a vessel model given as ``--liver_model`` is refused in one line.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inference.liver import embed_liver_model  # noqa: E402
from utils.logging_setup import setup_logging  # noqa: E402

log = logging.getLogger("embed_liver")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="vessel model file (main.py's best_model.pth)")
    p.add_argument("--liver_model", required=True, help="liver model file (scripts/train_liver.sh)")
    p.add_argument("--out", required=True, help="the combined model file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    setup_logging()
    try:
        out = embed_liver_model(args.model, args.liver_model, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        log.error("%s", " ".join(str(e).split()))
        return 1
    print(f"model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
