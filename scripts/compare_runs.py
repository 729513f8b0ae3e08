"""Print (and optionally write) one Markdown table comparing test.py reports.

    python scripts/compare_runs.py --out table.md none=path/to/eval_a offline=path/to/eval_b
    python scripts/compare_runs.py --ci offline=seed0/eval,seed1/eval,seed2/eval

Several comma-separated folders under one label pool their per-case rows (seeds, directions).
``--record NAME`` also writes ``results/NAME.json`` (utils.records.write_record): the table, which
the documentation renders, and every report's per-case values (``numbers.rows``,
evaluation.compare.report_values), which curves and plots read; the ablation, sim-to-real and
learning-curve scripts pass ``RECORD``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.compare import compare_table, report_values  # noqa: E402
from utils.atomic import atomic_path  # noqa: E402
from utils.records import RESULTS_DIR, check_new_record, write_record  # noqa: E402

DESCRIPTION = "test.py reports side by side (compare_runs.py): Dice, clDice and the other metrics"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="label=report_folder")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--ci", action="store_true", help="cells are mean [95%% CI] instead of mean ± std")
    p.add_argument("--record", default=None, metavar="NAME",
                   help="also write results/NAME.json: the table and every report's per-case values")
    p.add_argument("--record_dir", default=str(RESULTS_DIR), help="folder of --record (default: results/)")
    args = p.parse_args(argv)
    if args.record:
        try:
            check_new_record(args.record, Path(args.record_dir))
        except ValueError as e:
            p.error(f"--record: {e}")
    runs = []
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep:
            p.error(f"{item!r}: expected label=report_folder")
        runs.append((label, [Path(f) for f in folder.split(",")]))
    try:
        table = compare_table(runs, ci=args.ci)
        values = report_values(runs) if args.record else None
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table)
    print(table)
    if args.record:
        lines = table.splitlines()
        path = write_record(args.record, {"table_markdown": lines, "printed": lines + [""], "rows": values},
                            description=DESCRIPTION, inputs={"runs": [item for item in args.runs]},
                            folder=Path(args.record_dir))
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
