"""Two trees against one binary mask (issue 26): a table from test.py reports.

    python bench/tree_scores.py --binary REPORT_DIR --trees REPORT_DIR [--trees REPORT_DIR ...] \
        --label "phantom test" --record tree_scores_phantom

``--binary``: the report (``test.py --output``) of a binary model on the same cases; each
``--trees``: a report of a model trained with ``main.py --classes portal,hepatic``. Give one
``--binary`` for all rows, or one per ``--trees`` (in the same order) when the rows test different
cases, e.g. each direction of a two-patient cross test; each two-tree row then follows the row of
its binary model, "binary (<cases>)", which rows on the same cases share. Per row: the
union's Dice and clDice, each tree's Dice, and the share of found vessel voxels given the other
tree, voxel by voxel (``wrong_tree_share_voxelwise``) and as written (``wrong_tree_share``, what
predict.py writes: after the one-tree-per-piece step for a two-tree model, after the minimum cut
of ``--tree_smoothness`` for a tree model; reports made before the cut, commit ``b133667`` and
earlier, wrote a tree model's labels as they were, so its two columns agree there). Means over the
report's cases. Prints a Markdown
table; ``--record NAME`` writes ``results/NAME.json`` (utils.records).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.records import new_record_arg, write_record  # noqa: E402


def _mean(summary: dict, key: str) -> float:
    m = summary["metrics"].get(key)
    return float("nan") if m is None or m.get("mean") is None else float(m["mean"])


def row_of(report: Path) -> dict:
    """One row of scores from a test.py report folder (its summary.json)."""
    path = Path(report) / "summary.json"
    try:
        doc = json.loads(path.read_text())
        meta = doc["meta"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a test.py report ({e})") from None
    out = {"report": str(report), "model_sha256": meta["model_sha256"], "salience": meta["salience"],
           "cases": meta["cases"], "eval_roi": meta["eval_roi"], "dice": _mean(doc, "dice"),
           "cldice": _mean(doc, "cldice")}
    for k in ("portal_dice", "hepatic_dice", "wrong_tree_share_voxelwise", "wrong_tree_share"):
        out[k] = _mean(doc, k)
    # the tree model's cut (None for a report made before it existed, or without a tree model)
    out["tree_smoothness"] = (meta.get("tree_model") or {}).get("smoothness")
    return out


def fmt(v: float, pct: bool = False) -> str:
    if v != v:  # NaN
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def table_rows(binary: Sequence[str], trees: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
    """Rows by name: one binary report for all, "binary", then the two-tree rows; or one binary
    report per two-tree report, "binary (<its cases>)" before the first two-tree row it pairs."""
    if len(binary) == 1:
        rows = {"binary": row_of(Path(binary[0]))}
        rows.update({n: row_of(Path(t)) for n, t in zip(names, trees)})
        return rows
    if len(binary) != len(trees):
        raise ValueError(f"give one --binary or one per --trees, got {len(binary)} and {len(trees)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--names must be different from each other, got {list(names)}")
    rows = {}
    for b, t, n in zip(binary, trees, names):
        base = row_of(Path(b))
        name = f"binary ({', '.join(base['cases'])})"
        if name not in rows:  # rows on the same cases share their binary row
            rows[name] = base
        elif rows[name]["model_sha256"] != base["model_sha256"]:
            raise ValueError(f"{b}: another binary model on the cases of {rows[name]['report']} "
                             "(rows on the same cases share one binary row)")
        rows[n] = row_of(Path(t))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", action="append", required=True,
                   help="test.py report folder of the binary model: once, or once per --trees")
    p.add_argument("--trees", action="append", required=True, help="test.py report folder of a two-tree model")
    p.add_argument("--names", default=None, help="comma-separated row names of the --trees reports")
    p.add_argument("--label", default="", help="what the cases are, for the record's description")
    p.add_argument("--record", type=new_record_arg, default=None)
    args = p.parse_args()
    names = args.names.split(",") if args.names else [f"two trees {i + 1}" for i in range(len(args.trees))]
    if len(names) != len(args.trees):
        p.error(f"--names gives {len(names)} names for {len(args.trees)} --trees reports")
    try:
        rows = table_rows(args.binary, args.trees, names)
    except ValueError as e:
        p.error(str(e))
    table = ["| model | union Dice | union clDice | portal Dice | hepatic Dice | wrong tree, voxel by voxel | "
             "wrong tree, as written |", "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        table.append(f"| {n} | {fmt(r['dice'])} | {fmt(r['cldice'])} | {fmt(r['portal_dice'])} | "
                     f"{fmt(r['hepatic_dice'])} | {fmt(r['wrong_tree_share_voxelwise'], True)} | "
                     f"{fmt(r['wrong_tree_share'], True)} |")
    print("\n".join(table))
    if args.record:
        path = write_record(args.record, {"rows": rows, "table_markdown": table}, description=(
            f"two trees (a two-tree model, main.py --classes portal,hepatic, or the binary model with a tree "
            f"model, test.py --tree_model) against the binary model on {args.label}: "
            "means over cases of test.py's union and per-tree scores (eval_roi in each row) and the share of "
            "found vessel voxels given the other tree"),
            inputs={"binary": args.binary, "trees": args.trees})
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
