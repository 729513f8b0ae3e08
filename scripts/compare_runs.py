"""Print (and optionally write) one Markdown table comparing test.py reports.

    python scripts/compare_runs.py --out table.md none=path/to/eval_a offline=path/to/eval_b
    python scripts/compare_runs.py --ci offline=seed0/eval,seed1/eval,seed2/eval

Several comma-separated folders under one label pool their per-case rows (seeds, directions).
``--record NAME`` also writes the table as ``results/NAME.json`` (utils.records.run_recorded),
which the documentation renders; the ablation and sim-to-real scripts pass ``RECORD``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.compare import compare_table  # noqa: E402
from utils.atomic import atomic_path  # noqa: E402
from utils.records import run_recorded  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="label=report_folder")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--ci", action="store_true", help="cells are mean [95%% CI] instead of mean ± std")
    args = p.parse_args(argv)
    runs = []
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep:
            p.error(f"{item!r}: expected label=report_folder")
        runs.append((label, [Path(f) for f in folder.split(",")]))
    try:
        table = compare_table(runs, ci=args.ci)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_recorded(main, "test.py reports side by side (compare_runs.py): Dice, clDice and the other metrics"))
