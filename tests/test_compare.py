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


def test_compare_runs_records_every_reports_values(tmp_path, capsys):
    from scripts import compare_runs
    from utils.records import read_record
    a = _report(tmp_path / "on7", [0.60])
    b = _report(tmp_path / "on1", [0.50, 0.40])
    assert compare_runs.main(["--ci", f"400 it={a},{b}", "--record", "curve", "--record_dir", str(tmp_path)]) == 0
    rec = read_record(tmp_path / "curve.json")
    assert rec["numbers"]["table_markdown"][2].startswith("| 400 it | 3 | 0.500 [")
    (row,) = rec["numbers"]["rows"]
    assert row["label"] == "400 it" and [r["folder"] for r in row["reports"]] == [str(a), str(b)]
    assert [[c["dice"] for c in r["cases"]] for r in row["reports"]] == [[0.60], [0.50, 0.40]]
    assert row["reports"][1]["cases"][1]["case"] == "case0001"
    assert row["reports"][0]["cases"][0]["components_ratio"] is None  # NaN kept as null
    assert compare_runs.main([f"x={tmp_path / 'missing'}", "--record", "y", "--record_dir", str(tmp_path)]) == 1
    assert not (tmp_path / "y.json").exists()


def test_by_test_case_splits_directions_and_pools_seeds(tmp_path):
    from evaluation.compare import by_test_case, report_values
    runs = [("r", [_report(tmp_path / f"s{s}", [0.5 + s / 10, 0.2 + s / 10]) for s in range(3)])]
    ((label, per_case, pooled),) = by_test_case(report_values(runs), "dice")
    assert label == "r"
    assert per_case["case0000"] == pytest.approx([0.5, 0.6, 0.7]) and per_case["case0001"] == pytest.approx([0.2, 0.3, 0.4])
    assert sorted(pooled) == pytest.approx(sorted([0.5, 0.6, 0.7, 0.2, 0.3, 0.4]))
    ((_, none, pooled_none),) = by_test_case(report_values(runs), "components_ratio")  # all NaN
    assert none == {} and pooled_none == []


def test_learning_curves_plot_and_table_come_from_the_records(tmp_path, monkeypatch):
    """Two settings, two test patients, two seeds: the plotted points and the rendered cells are
    the per-direction means over seeds and the pooled mean of the values written."""
    from scripts import compare_runs, plot_curves, render_docs
    from utils.records import read_record
    runs = []
    for it, base in (("400", 0.50), ("1500", 0.60)):
        folders = []
        for seed in (0, 1):
            for case, off in ((7, 0.0), (1, -0.1)):
                f = tmp_path / f"it{it}_s{seed}_on{case}"
                f.mkdir()
                r = {k: 0.5 for k in KEYS}
                r.update(case=f"case{case:04d}", dice=base + off + seed * 0.02, cldice=base + 0.1 + off)
                write_per_case_csv(f / "per_case.csv", [r], KEYS)
                folders.append(str(f))
        runs.append(f"{it}={','.join(folders)}")
    assert compare_runs.main(["--ci", *runs, "--record", "real_curves_iterations", "--record_dir", str(tmp_path)]) == 0
    rows = read_record(tmp_path / "real_curves_iterations.json")["numbers"]["rows"]
    out = tmp_path / "curves.png"
    drawn = plot_curves.plot_curves({"iterations": rows}, out)
    labels, per_case, pooled = drawn["iterations"]["dice"]
    assert labels == ["400", "1500"]
    assert per_case["case0007"] == pytest.approx([0.51, 0.61]) and per_case["case0001"] == pytest.approx([0.41, 0.51])
    assert pooled == pytest.approx([0.46, 0.56])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no learning-curve records"):
        plot_curves.plot_curves({}, tmp_path / "none.png")
    # the rendered table: the same means per direction, the pooled mean with its interval
    monkeypatch.setattr(render_docs, "RESULTS_DIR", tmp_path)
    text = render_docs.real_curves()
    row = [ln for ln in text.splitlines() if ln.startswith("| 1500 |")][0].split(" | ")
    assert row[1:3] == ["0.510", "0.610"]  # on 1, on 7
    assert row[3].startswith("0.560 [")
