"""Per-case CSV, summary JSON (mean, std, 95% CI over cases, NaN counts) and a Markdown table.

Statistics are over cases (each case one number), ignoring NaN values and counting them:
std uses ddof=1; the 95% confidence interval of the mean is mean +- t_{0.975, n-1} * std / sqrt(n)
(Student's t), NaN when fewer than two cases have a value.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

# (key, column header, number format) for the Markdown / console tables
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dice", "Dice", "{:.4f}"),
    ("cldice", "clDice", "{:.4f}"),
    ("iou", "IoU", "{:.4f}"),
    ("sensitivity", "Sens", "{:.4f}"),
    ("specificity", "Spec", "{:.4f}"),
    ("precision", "Prec", "{:.4f}"),
    ("hd95_mm", "HD95 mm", "{:.2f}"),
    ("assd_mm", "ASSD mm", "{:.2f}"),
    ("cl_recall_lt1", "CLrec <1", "{:.3f}"),
    ("cl_recall_1to2", "CLrec 1-2", "{:.3f}"),
    ("cl_recall_2to3", "CLrec 2-3", "{:.3f}"),
    ("cl_recall_ge3", "CLrec >=3", "{:.3f}"),
    ("components_pred", "CC pred", "{:.1f}"),
    ("components_true", "CC true", "{:.1f}"),
)


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per metric: n (cases with a value), n_nan, mean, std, ci95_low, ci95_high, min, max."""
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        vals = np.array([float(r[k]) for r in rows], dtype=np.float64)
        ok = vals[~np.isnan(vals)]
        n = int(ok.size)
        s: dict[str, float] = {"n": n, "n_nan": int(vals.size - n)}
        if n:
            mean = float(ok.mean())
            std = float(ok.std(ddof=1)) if n > 1 else math.nan
            half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
            s.update(mean=mean, std=std, ci95_low=mean - half, ci95_high=mean + half,
                     min=float(ok.min()), max=float(ok.max()))
        else:
            s.update(mean=math.nan, std=math.nan, ci95_low=math.nan, ci95_high=math.nan, min=math.nan, max=math.nan)
        out[k] = s
    return out


def _json_safe(obj: Any) -> Any:
    # JSON has no NaN; write null so any JSON reader accepts the file
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def write_per_case_csv(path: Path, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """One row per case: ``case`` then ``keys``; NaN written as ``nan``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", *keys])
        for r in rows:
            w.writerow([r["case"], *[_fmt_csv(r[k]) for k in keys]])


def _fmt_csv(v: Any) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    return "nan" if math.isnan(v) else repr(v)


def read_per_case_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``per_case.csv``: ``case`` a string, every other column a float (NaN kept)."""
    with open(path, newline="") as f:
        return [{k: (v if k == "case" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def write_summary_json(path: Path, summary: dict, meta: dict) -> None:
    """``summary.json``: ``meta`` (model, options, cases), the case count and the per-metric
    :func:`summarize` statistics; NaN written as null so any JSON reader accepts the file."""
    n_cases = meta.get("n_cases")
    doc = {"meta": meta, "n_cases": n_cases, "metrics": summary}
    path.write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")


def _cell(v: float, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def markdown_table(rows: Sequence[dict[str, Any]], summary: dict[str, dict[str, float]],
                   columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """A GitHub Markdown table: one row per case, then mean +- std and the 95% CI."""
    head = "| Case | " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|---|" + "|".join("---:" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append(f"| {r['case']} | " + " | ".join(_cell(float(r[k]), f) for k, _, f in columns) + " |")
    ms = []
    for k, _, f in columns:
        s = summary[k]
        ms.append(_cell(s["mean"], f) + ("" if math.isnan(s["std"]) else " ± " + _cell(s["std"], f)))
    lines.append("| **mean ± std** | " + " | ".join(ms) + " |")
    ci = ["n/a" if math.isnan(summary[k]["ci95_low"]) else
          f"{_cell(summary[k]['ci95_low'], f)} to {_cell(summary[k]['ci95_high'], f)}" for k, _, f in columns]
    lines.append("| 95% CI | " + " | ".join(ci) + " |")
    return "\n".join(lines) + "\n"


#: what the per-tree tables' "wrong tree" columns hold
WRONG_TREE = "of the true vessel voxels found, the share given the other tree"


def tree_columns(classes: Sequence[str]) -> list[tuple[str, str, str]]:
    """The per-tree table's columns (key, heading, format) of a report of ``classes`` (a two-tree
    model or a tree model): each tree's Dice and clDice, then the share of found vessel voxels given
    the other tree as written and voxel by voxel (``evaluation.runner.tree_keys``)."""
    cols = [(f"{c}_{k}", f"{c} {h}", "{:.4f}") for c in classes for k, h in (("dice", "Dice"), ("cldice", "clDice"))]
    return cols + [("wrong_tree_share", "wrong tree", "{:.1%}"),
                   ("wrong_tree_share_voxelwise", "wrong tree, voxel by voxel", "{:.1%}")]


def console_table(rows: Sequence[dict[str, Any]], summary: dict[str, dict[str, float]],
                  columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """Fixed-width plain-text table for the terminal."""
    header = ["case"] + [h for _, h, _ in columns]
    body = [[str(r["case"])] + [_cell(float(r[k]), f) for k, _, f in columns] for r in rows]
    body.append(["mean"] + [_cell(summary[k]["mean"], f) for k, _, f in columns])
    body.append(["std"] + [_cell(summary[k]["std"], f) for k, _, f in columns])
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))  # noqa: E731
    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *[fmt(r) for r in body[:-2]], rule, *[fmt(r) for r in body[-2:]]])
