"""Comparison tables that pool per-case rows over several report folders (seeds, directions)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from evaluation.compare import compare_table, pooled_rows
from evaluation.metrics import METRIC_KEYS
from evaluation.reports import write_per_case_csv

KEYS = list(METRIC_KEYS)


def _report(folder: Path, dices: list[float]) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for i, d in enumerate(dices):
        r = {k: 0.5 for k in KEYS}
        r.update(case=f"case{i:04d}", dice=d, components_ratio=float("nan"))
        rows.append(r)
    write_per_case_csv(folder / "per_case.csv", rows, KEYS)
    return folder


def test_pooled_mean_and_t_interval(tmp_path):
    a = _report(tmp_path / "seed0", [0.60, 0.70])
    b = _report(tmp_path / "seed1", [0.80])
    assert [r["dice"] for r in pooled_rows([a, b])] == [0.60, 0.70, 0.80]
    vals = np.array([0.60, 0.70, 0.80])
    half = stats.t.ppf(0.975, 2) * vals.std(ddof=1) / math.sqrt(3)
    table = compare_table([("offline", [a, b])], ci=True)
    row = [ln for ln in table.splitlines() if ln.startswith("| offline")][0]
    assert f"| offline | 3 | 0.700 [{0.7 - half:.3f}, {0.7 + half:.3f}] |" in row
    # a metric that is NaN in every case is "n/a", not a number
    assert row.rstrip().endswith("| n/a |")
    # without ci: mean ± std of the same pooled values
    assert f"0.700 ± {vals.std(ddof=1):.3f}" in compare_table([("offline", [a, b])])


def test_single_folder_and_missing_report(tmp_path):
    a = _report(tmp_path / "run", [0.5, 0.7])
    assert "| single | 2 | 0.600 ±" in compare_table([("single", a)])
    with pytest.raises(FileNotFoundError, match="nowhere/per_case.csv"):
        compare_table([("x", [a, tmp_path / "nowhere"])])
