"""One comparison table from several test.py report folders (ablations, benchmarks).

Each row has a label and one or more report folders. The per-case rows of all its folders
(``per_case.csv``) are pooled, so a row can stand for several seeds or several train/test
directions, and each metric is summarised over the pooled values with
:func:`evaluation.reports.summarize` (mean, std, Student-t 95% CI).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from evaluation.reports import read_per_case_csv, summarize

# (per-case key, column header, format)
COMPARE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dice", "Dice", "{:.3f}"),
    ("cldice", "clDice", "{:.3f}"),
    ("hd95_mm", "HD95 mm", "{:.2f}"),
    ("cl_recall_lt1", "CL recall <1 mm", "{:.3f}"),
    ("cl_recall_1to2", "CL recall 1-2 mm", "{:.3f}"),
    ("components_ratio", "components pred/true", "{:.1f}"),
)


def _finite(v: float | None) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _cell(stats: dict, fmt: str, ci: bool) -> str:
    mean = stats.get("mean")
    if not _finite(mean):
        return "n/a"
    s = fmt.format(mean)
    if ci:
        lo, hi = stats.get("ci95_low"), stats.get("ci95_high")
        if _finite(lo) and _finite(hi):
            s += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
    elif _finite(stats.get("std")):
        s += " ± " + fmt.format(stats["std"])
    return s


def pooled_rows(folders: Sequence[Path]) -> list[dict]:
    """The per-case rows of every folder, in order; ``FileNotFoundError`` naming a folder without a report."""
    rows: list[dict] = []
    for folder in folders:
        path = Path(folder) / "per_case.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no per_case.csv (run test.py for this run first)")
        rows.extend(read_per_case_csv(path))
    return rows


#: the per-case values a comparison record keeps for each report (what curves and plots need)
RECORD_KEYS: tuple[str, ...] = ("dice", "cldice", "sensitivity", "precision", "hd95_mm", "cl_recall_lt1",
                                "cl_recall_1to2", "components_pred", "components_true", "components_ratio")


def _plain(v: object) -> object:
    return v if _finite(v) else None


def report_values(runs: Sequence[tuple[str, Path | Sequence[Path]]],
                  keys: Sequence[str] = RECORD_KEYS) -> list[dict]:
    """The per-case values behind :func:`compare_table`, kept apart by report folder:
    ``[{"label", "reports": [{"folder", "cases": [{"case", key: value (None for NaN)}]}]}]``, so a
    record can be re-plotted per seed or train/test direction without the folders."""
    out = []
    for label, folders in runs:
        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        reports = []
        for folder in folders:
            rows = pooled_rows([folder])
            reports.append({"folder": str(folder),
                            "cases": [{"case": r["case"], **{k: _plain(r[k]) for k in keys if k in r}} for r in rows]})
        out.append({"label": label, "reports": reports})
    return out


def by_test_case(rows: Sequence[dict], key: str) -> list[tuple[str, dict[str, list[float]], list[float]]]:
    """Per row of :func:`report_values` (as a record keeps it): (label, {test case: the values of
    ``key`` over the row's reports (seeds)}, every value pooled), NaN / None left out. The
    learning-curve tables and plot read one train/test direction per test case from it."""
    out = []
    for row in rows:
        per_case: dict[str, list[float]] = {}
        for rep in row["reports"]:
            for c in rep["cases"]:
                v = c.get(key)
                if _finite(v):
                    per_case.setdefault(str(c["case"]), []).append(float(v))
        out.append((row["label"], per_case, [v for vals in per_case.values() for v in vals]))
    return out


def curve_series(rows: Sequence[dict], key: str) -> tuple[list[str], dict[str, list[float]], list[list[float]]]:
    """One learning curve of a record's ``numbers.rows`` (:func:`by_test_case`) for metric ``key``:
    (setting labels, {test case, in name order: the mean over seeds per setting, NaN where it has
    none}, every setting's pooled values). The curves' tables and plot both read it."""
    series = by_test_case(rows, key)
    cases = sorted({c for _, per, _ in series for c in per})
    per_case = {c: [sum(per[c]) / len(per[c]) if per.get(c) else math.nan for _, per, _ in series] for c in cases}
    return [label for label, _, _ in series], per_case, [pooled for _, _, pooled in series]


def compare_table(runs: Sequence[tuple[str, Path | Sequence[Path]]], ci: bool = False,
                  columns: Sequence[tuple[str, str, str]] = COMPARE_COLUMNS) -> str:
    """Markdown table, one row per (label, report folder or folders).

    Cells are mean ± std over the pooled per-case values, or mean [95% CI] when ``ci``.
    The "values" column counts the pooled per-case rows (cases x folders).
    """
    header = ["run", "values"] + [h for _, h, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, folders in runs:
        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        rows = pooled_rows(folders)
        stats = summarize(rows, [k for k, _, _ in columns])
        cells = [label, str(len(rows))] + [_cell(stats[k], fmt, ci) for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
