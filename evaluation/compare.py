"""One comparison table from several test.py report folders (ablations).

Each run contributes a row: its label, then mean +- std over cases of the chosen metrics,
read from the run's ``summary.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

# (summary key, column header, format)
COMPARE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dice", "Dice", "{:.3f}"),
    ("cldice", "clDice", "{:.3f}"),
    ("hd95_mm", "HD95 mm", "{:.2f}"),
    ("cl_recall_lt1", "CL recall <1 mm", "{:.3f}"),
    ("cl_recall_1to2", "CL recall 1-2 mm", "{:.3f}"),
    ("components_ratio", "components pred/true", "{:.1f}"),
)


def _cell(stats: dict, fmt: str) -> str:
    mean, std = stats.get("mean"), stats.get("std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    s = fmt.format(mean)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        s += " ± " + fmt.format(std)
    return s


def compare_table(runs: Sequence[tuple[str, Path]]) -> str:
    """Markdown table; ``runs`` are (label, report folder holding summary.json)."""
    header = ["run", "cases"] + [h for _, h, _ in COMPARE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, folder in runs:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no summary.json (run test.py for this run first)")
        doc = json.loads(path.read_text())
        metrics = doc["metrics"]
        cells = [label, str(doc.get("n_cases", ""))]
        cells += [_cell(metrics.get(k, {}), fmt) for k, _, fmt in COMPARE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
