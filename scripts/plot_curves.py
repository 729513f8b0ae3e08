"""Plot the learning curves on real CT from scripts/real_curves.sh's records.

    python scripts/plot_curves.py                       # results/real_curves_*.json -> imgs/real_curves.png
    python scripts/plot_curves.py --prefix real_curves --out imgs/real_curves.png

One panel per axis recorded (iterations, phantoms, width, salience, in that order): Dice (solid)
and clDice (dashed) on each real patient, trained on the other (mean over seeds), and the two
pooled (black). The figures come only from the records (``numbers.rows``, written by
``scripts/compare_runs.py --record``), so the plot can be redrawn without the runs' folders.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.compare import curve_series  # noqa: E402
from utils.atomic import atomic_path  # noqa: E402
from utils.logging_setup import setup_logging  # noqa: E402
from utils.records import RESULTS_DIR, read_record  # noqa: E402

log = logging.getLogger("plot_curves")

AXES = ("iterations", "phantoms", "width", "salience")
METRICS = (("dice", "Dice", "-"), ("cldice", "clDice", "--"))


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals) if vals else math.nan


def plot_curves(records: dict[str, list[dict]], out: str | Path) -> dict[str, dict]:
    """Draw one panel per axis of ``records`` ({axis: numbers.rows}) into the PNG ``out`` (written
    atomically); returns what each panel plots: {axis: {metric: (setting labels, {test case: the
    means over seeds}, the pooled means)}} (evaluation.compare.curve_series)."""
    if not records:
        raise ValueError("no learning-curve records to plot")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn: dict[str, dict] = {}
    fig, axes = plt.subplots(1, len(records), figsize=(max(6.0, 4.2 * len(records)), 4.2), squeeze=False)
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for ax, (axis, rows) in zip(axes[0], records.items()):
        drawn[axis] = {}
        for key, name, style in METRICS:
            labels, per_case, pooled_values = curve_series(rows, key)
            pooled = [_mean(v) for v in pooled_values]
            drawn[axis][key] = (labels, per_case, pooled)
            x = list(range(len(labels)))
            for colour, (case, ys) in zip(colours, per_case.items()):
                ax.plot(x, ys, style, marker="o", color=colour, alpha=0.7,
                        label=f"{name}, tested on {case.replace('case000', 'patient ')}")
            ax.plot(x, pooled, style, marker="s", color="black", label=f"{name}, both")
            ax.set_xticks(x, labels, rotation=20, fontsize=8)
        ax.set_title(axis)
        ax.grid(alpha=0.3)
    # one score scale on every panel, wide enough for every point (no point drawn off the axes)
    finite = [v for d in drawn.values() for _, per_case, pooled in d.values()
              for v in [*pooled, *(y for ys in per_case.values() for y in ys)] if v == v]
    low = min([0.3, *finite])
    for ax in axes[0]:
        ax.set_ylim(0.1 * int(low * 10), 0.9)
    axes[0][0].set_ylabel("score inside the liver")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=3)
    fig.suptitle("Trained on one real patient + phantoms, tested on the other", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return drawn


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prefix", default="real_curves", help="records results/<prefix>_<axis>.json")
    p.add_argument("--records", default=str(RESULTS_DIR), help="folder of the records")
    p.add_argument("--out", default="imgs/real_curves.png")
    args = p.parse_args(argv)
    setup_logging()
    try:
        records = {a: read_record(Path(args.records) / f"{args.prefix}_{a}.json")["numbers"]["rows"]
                   for a in AXES if (Path(args.records) / f"{args.prefix}_{a}.json").is_file()}
        plot_curves(records, args.out)
    except (ValueError, KeyError) as e:
        log.error("%s: %s", args.records, " ".join(str(e).split()))
        return 1
    print(f"figure: {args.out} ({', '.join(records)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
