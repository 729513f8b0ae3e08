"""Render the documentation's tables from the result records and the command lines' parsers.

    python scripts/render_docs.py           # rewrite the rendered blocks of README.md and docs/*.md
    python scripts/render_docs.py --check   # exit 1, naming each document that is not up to date

A rendered block sits between two markers in a Markdown file (``table-<record>`` renders the
Markdown table a bench script printed, kept by its ``--record``)::

    <!-- render:NAME -->
    ... replaced by RENDERERS[NAME]() ...
    <!-- /render:NAME -->

Figures come only from ``results/<name>.json`` (utils.records: the command, code version,
machine and date beside the numbers; every table names its record), flag tables only from
each command's ``build_parser()``. Nothing in a block is typed by hand, and the test suite
fails when a committed document differs from what this script renders.
"""
from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.records import RESULTS_DIR, read_record  # noqa: E402

DOCUMENTS = ("README.md", "docs/USAGE.md", "docs/RESULTS.md", "docs/BENCHMARKS.md", "docs/PHANTOMS.md", "docs/GPU.md",
             "docs/DESIGN.md")
BLOCK = re.compile(r"(<!-- render:([\w-]+) -->\n)(.*?)(<!-- /render:\2 -->)", re.S)
#: the command lines whose flags docs/USAGE.md lists, by module
COMMANDS = ("make_phantoms", "preprocess", "salience_generation", "main", "test", "predict", "train_tree_model",
            "train_branch_model")


def record(name: str) -> dict:
    return read_record(RESULTS_DIR / f"{name}.json")


def source(*names: str) -> str:
    """The line under a table that says where its figures come from."""
    parts = []
    for n in names:
        r = record(n)
        m = r["machine"]
        where = f"{m.get('cpu_count')} CPU cores" + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")
        parts.append(f"[`results/{n}.json`](../results/{n}.json) (`{r['command']}`, commit "
                     f"`{r['code_version'][:10]}`, {where}, {r['date'][:10]})")
    return "*Measured: " + "; ".join(parts) + ".*"


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------- renderers
def extent_invariance() -> str:
    rows = ["| salience rule | patient | Dice whole vs cropped | Dice padded vs whole | vessel Dice: whole scan | "
            "liver-cropped | padded |", "|---|---|---|---|---|---|---|"]
    names = ("extent_invariance_volume_rule", "extent_invariance_fixed_rule")
    for name in names:
        r = record(name)
        rule = r["numbers"]["normalisation"]
        for patient, p in r["numbers"]["patients"].items():
            t = p["dice_truth"]
            rows.append(f"| `{rule}` | {patient} | {p['dice_whole_vs_cropped']:.4f} | {p['dice_padded_vs_whole']:.4f} "
                        f"| {t['whole']:.3f} | {t['cropped']:.3f} | {t['padded']:.3f} |")
    return "\n".join(rows) + "\n\n" + source(*names) + "\n"


def demo_phantom() -> str:
    r = record("demo_phantom")["numbers"]
    keys = (("dice", "Dice"), ("cldice", "clDice"), ("sensitivity", "sensitivity"), ("precision", "precision"),
            ("hd95_mm", "HD95 mm"), ("assd_mm", "ASSD mm"), ("components_pred", "pieces (truth: 1)"))
    rows = ["| metric | mean | 95% CI |", "|---|---|---|"]
    for k, label in keys:
        m = r["metrics"][k]
        ci = f"[{m['ci95_low']:.3f}, {m['ci95_high']:.3f}]" if m.get("ci95_low") is not None else "n/a"
        rows.append(f"| {label} | {_fmt(m['mean'])} | {ci} |")
    return (f"{r['n_cases']} phantom test patients, inside the liver, the `make demo` model "
            f"(salience {r['salience']}, normalisation {r['normalisation']}).\n\n" + "\n".join(rows) + "\n\n"
            + source("demo_phantom") + "\n")


def _mean_per(patients: dict, value) -> str:
    """"mean (patient 1 v1, patient 7 v7)" of ``value(row)`` over a record's patients."""
    vals = {p: float(value(r)) for p, r in patients.items()}
    per = ", ".join(f"{p.replace('3Dircadb1.', 'patient ')} {v:.3f}" for p, v in vals.items())
    return f"{sum(vals.values()) / len(vals):.3f} ({per})"


def _recipe_headline() -> str:
    """The headline's second table: scripts/train_real.sh's model on the real patient it did not see."""
    tested = {}
    for n in REAL_RECIPE_RECORDS:
        r = record(n)["numbers"]
        tested[", ".join(f"3Dircadb1.{_test_patient(c)}" for c in r["cases"])] = r["metrics"]
    return ("| `scripts/train_real.sh` (one real patient + phantoms, 2 CPU cores) | Dice | clDice |\n|---|---|---|\n"
            f"| the other real patient, inside the liver | {_mean_per(tested, lambda m: m['dice']['mean'])} | "
            f"{_mean_per(tested, lambda m: m['cldice']['mean'])} |\n\n")


def headline() -> str:
    """The README's results: ``make demo``'s model on phantoms (demo_phantom) and on the real patients
    without and with the automatic liver, and the liver itself, all three from one record
    (train_liver.sh's default recipe in LIVER_RECIPE_ROWS, seed 0; seed 1 beside it), so they describe
    one vessel model; then train_real.sh's models."""
    by_seed = dict(next(seeds for label, seeds in LIVER_RECIPE_ROWS if label == LIVER_DEFAULT_RECIPE))
    liver = record(by_seed["0"])["numbers"]["patients"]
    liver1 = record(by_seed["1"])["numbers"]["patients"]
    demo = record("demo_phantom")["numbers"]
    return (f"| the `make demo` model (phantoms only, 2 CPU cores, {demo['iterations']} iterations) | Dice |\n"
            f"|---|---|\n"
            f"| {demo['n_cases']} phantom test patients, inside the liver | {demo['metrics']['dice']['mean']:.3f} |\n"
            f"| real 3D-IRCADb patients, `predict.py` on the whole scan, scored inside the liver | "
            f"{_mean_per(liver, lambda r: r['vessels']['no_liver']['dice_in_liver'])} |\n"
            f"| the same with the automatic liver (`--liver_model`, trained on the other patient and phantoms) | "
            f"{_mean_per(liver, lambda r: r['vessels']['auto_liver']['dice_in_liver'])} |\n"
            f"| the automatic liver itself: liver Dice | {_mean_per(liver, lambda r: r['liver_dice'])}; "
            f"another training seed: {_mean_per(liver1, lambda r: r['liver_dice'])} |\n\n"
            + _recipe_headline() +
            f"Sources: [`results/demo_phantom.json`](results/demo_phantom.json), "
            + "".join(f"[`results/{by_seed[s]}.json`](results/{by_seed[s]}.json), " for s in ("0", "1"))
            + ", ".join(f"[`results/{n}.json`](results/{n}.json)" for n in REAL_RECIPE_RECORDS) + " "
            f"(rendered by `scripts/render_docs.py`; how they were measured: [docs/RESULTS.md](docs/RESULTS.md)).\n")


#: the README's two-tree table: per tree-model seed of train_tree_model.sh's recipe (with branch networks), the
#: record, its rows' name before " (<set>)", and what the README calls the row
TREE_RECIPE_ROWS = (
    ("tree_branches_one_thread", "tree model + branch networks on one thread; seeds 0-9; cut",
     "seed 0 (the 3 mm grid sampled, before `coarse_rule`)"),
    ("tree_branches_seed1", "area rule + branch networks on its training phantoms", "seed 1"),
    ("tree_default_seed2", "train_tree_model.sh with SEED=2: tree model + branch networks", "seed 2"),
)
TREE_PHANTOM_SETS = ("seed-400 phantoms", "seed-300 phantoms", "seed-500 phantoms")
TREE_REAL_SET = "real patients 1 and 7"


def _tree_row(name: str, prefix: str, where: str) -> dict:
    rows = record(name)["numbers"]["rows"]
    key = f"{prefix} ({where})"
    if key not in rows:
        raise ValueError(f"results/{name}.json: no row {key!r}; rows: {', '.join(rows)}")
    return rows[key]


def _span(values: list[float], scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    lo, hi = min(values) * scale, max(values) * scale
    return f"{lo:.{digits}f}{unit}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else \
        f"{lo:.{digits}f}-{hi:.{digits}f}{unit}"


def tree_headline(up: str = "") -> str:
    """The README's two-tree figures: per tree-model seed, the share of found vessel voxels in the wrong
    tree and how far each tree's Dice lies under the union's, on the three phantom sets of 10 and on the
    real patients (means over cases, as bench/tree_scores.py gives them). ``up``: the path from the
    document to the repository's root ("../" from docs/)."""
    out = ["| `make demo`'s vessel model + `train_tree_model.sh`'s tree model and branch networks | "
           "wrong tree: 3 phantom sets of 10 | each tree's Dice under the union's: phantoms | "
           "wrong tree: real patients 1 and 7 | each tree's Dice under the union's: real |",
           "|---|---|---|---|---|"]

    def gaps(rows: list[dict]) -> list[float]:
        return [r["dice"] - r[k] for r in rows for k in ("portal_dice", "hepatic_dice")]

    for name, prefix, label in TREE_RECIPE_ROWS:
        ph = [_tree_row(name, prefix, s) for s in TREE_PHANTOM_SETS]
        real = _tree_row(name, prefix, TREE_REAL_SET)
        out.append(f"| {label} | {_span([r['wrong_tree_share'] for r in ph], 100, unit='%')} | "
                   f"{_span(gaps(ph), digits=2)} | {_span([real['wrong_tree_share']], 100, unit='%')} | "
                   f"{_span(gaps([real]), digits=2)} |")
    names = dict.fromkeys(n for n, _, _ in TREE_RECIPE_ROWS)
    return ("\n".join(out) + "\n\nThe aim is under 3% in the wrong tree on phantoms and each tree's Dice "
            "within 0.03 of the union's. Sources: "
            + ", ".join(f"[`results/{n}.json`]({up}results/{n}.json)" for n in names)
            + (" (how they were measured: [docs/RESULTS.md](docs/RESULTS.md#two-trees-portal-vein-and-hepatic-veins-"
               "benchtree_scorespy))" if not up else "") + ".\n")


#: RESULTS' comparison of liver-model recipes: what the row calls the recipe, and its liver_bench records by seed
LIVER_RECIPE_ROWS = (
    ("no bends (the recipe until now)", (("0", "liver_bench"), ("1", "liver_bench_seed1"), ("2", "liver_bench_seed2"))),
    ("`--elastic_aug 15`", (("0", "liver_bench_elastic15"), ("1", "liver_bench_elastic15_seed1"),
                            ("2", "liver_bench_elastic15_seed2"))),
    ("`--elastic_aug 25`", (("0", "liver_bench_elastic25"), ("1", "liver_bench_elastic25_seed1"))),
    ("`--elastic_aug 15`, trained again later", (("0", "liver_bench_elastic15_retrained"),
                                                  ("1", "liver_bench_elastic15_retrained_seed1"))),
    ("`--elastic_aug 15 --bias_aug 60`", (("0", "liver_bench_bias60"),)),
)
#: the row of LIVER_RECIPE_ROWS that is train_liver.sh's default, which the README quotes
LIVER_DEFAULT_RECIPE = "`--elastic_aug 15`"


def liver_recipes() -> str:
    """Per liver-model recipe and seed (LIVER_RECIPE_ROWS): each held-out patient's liver Dice as
    predict.py gives it and of the model's own mask, and the lowest of the first (the target is
    at least 0.93 on every patient)."""
    out = ["| liver model | seed | liver Dice: patient 1 | patient 7 | lowest | model's mask: patient 1 | patient 7 |",
           "|---|---|---|---|---|---|---|"]
    names = []
    for label, seeds in LIVER_RECIPE_ROWS:
        for seed, name in seeds:
            patients = record(name)["numbers"]["patients"]
            missing = [c for c in ("3Dircadb1.1", "3Dircadb1.7") if c not in patients]
            if missing:
                raise ValueError(f"results/{name}.json: no patient {', '.join(missing)}; it has {', '.join(patients)}")
            p1, p7 = patients["3Dircadb1.1"], patients["3Dircadb1.7"]
            out.append(f"| {label} | {seed} | {p1['liver_dice']:.3f} | {p7['liver_dice']:.3f} | "
                       f"{min(p1['liver_dice'], p7['liver_dice']):.3f} | {p1['liver_dice_model_mask']:.3f} | "
                       f"{p7['liver_dice_model_mask']:.3f} |")
            names.append(name)
    return "\n".join(out) + "\n\n" + source(*names) + "\n"


#: the latest ``bench/demo_time.py`` record (records are never overwritten: a new measurement is a new name)
DEMO_TIME_RECORD = "demo_time_v2"


def demo_time() -> str:
    """The README's sentence on how long ``make demo`` takes (``bench/demo_time.py``)."""
    r = record(DEMO_TIME_RECORD)
    n, m = r["numbers"], r["machine"]
    return (f"Measured: {n['total_s'] / 60:.1f} minutes on {m.get('cpu_count')} CPU cores once `make setup` has "
            f"run (median of {len(n['runs_total_s'])} runs in fresh clones of commit `{r['inputs']['commit'][:10]}`, "
            f"`bench/demo_time.py`; [`results/{DEMO_TIME_RECORD}.json`](results/{DEMO_TIME_RECORD}.json), "
            f"stage by stage in [docs/BENCHMARKS.md](docs/BENCHMARKS.md#make-demo-benchdemo_timepy)).\n")


def predict_speed(name: str = "predict_bench") -> str:
    r = record(name)
    n = r["numbers"]
    stages = n["stages"]
    rows = ["| scan | clock | " + " | ".join(stages) + " | total |", "|---" * (len(stages) + 3) + "|"]
    for scan, v in n["scans"].items():
        rows.append(f"| {scan} | wall | " + " | ".join(f"{v[s]:.1f}" for s in stages) + f" | {v['total']:.1f} |")
        rows.append(f"| {scan} | process CPU | " + " | ".join(f"{v['cpu_' + s]:.1f}" for s in stages)
                    + f" | {v['cpu']:.1f} |")
    return (f"`predict.py` end to end on a 512 x 512 x {r['inputs']['depth']} DICOM series, seconds, median of "
            f"{r['inputs']['repeats']} runs, {r['inputs']['threads']} torch threads, model: {r['inputs']['model']}.\n\n"
            + "\n".join(rows) + "\n\n" + source(name) + "\n")


def _flag_table(module: str) -> str:
    parser: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    rows = ["| flag | default | what |", "|---|---|---|"]
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        flag = ", ".join(a.option_strings) or a.dest
        if a.nargs not in (None, 0) and a.metavar:
            flag += " " + (" ".join(a.metavar) if isinstance(a.metavar, tuple) else str(a.metavar))
        elif a.choices:
            flag += " {" + ",".join(str(c) for c in a.choices) + "}"
        # a flag (store_true / store_false) is off unless given, whatever its dest's default says
        flag_action = isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        unset = flag_action or a.default is None or a.default is False or a.default == argparse.SUPPRESS
        default = "required" if a.required else ("" if unset else
                                                  f"`{a.default}`" if not isinstance(a.default, list) else
                                                  f"`{' '.join(str(x) for x in a.default)}`")
        # the table has a default column: a help text's own "; default %(default)..." (for --help) is dropped
        helptext = re.sub(r"; default %\(default\)\w", "", a.help or "")
        what = " ".join(helptext.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").split())
        rows.append(f"| `{flag}` | {default} | {what} |")
    return "\n".join(rows) + "\n"


def table_record(name: str) -> str:
    """A record that carries its own Markdown table (``numbers.table_markdown``, a list of lines)."""
    r = record(name)
    return "What: " + r["description"] + ".\n\n" + "\n".join(r["numbers"]["table_markdown"]) \
        + "\n\n" + source(name) + "\n"


def gpu_records() -> str:
    """The records measured on a machine with a GPU; says so when there is none."""
    rows = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        r = read_record(path)
        if r["machine"].get("gpu"):
            rows.append(f"| [`{path.name}`](../results/{path.name}) | {r['machine']['gpu']} | {r['date'][:10]} | "
                        f"{r['description']} |")
    if not rows:
        return ("None yet: no record in `results/` was measured on a GPU. The CUDA, AMP and nccl paths are tested "
                "on the CPU only (`SMOKE_DEVICE=cpu bash scripts/gpu_smoke.sh` and the test suite); run the two "
                "scripts above on a GPU box and publish what they print.\n")
    return "| record | GPU | date | what |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


#: records of scripts/train_real.sh's model on the other real patient: record -> the patient trained on
REAL_RECIPE_RECORDS = {"train_real_1to7": "real patient 1", "train_real_7to1": "real patient 7"}


def real_recipe() -> str:
    """test.py reports of models trained by scripts/train_real.sh on one real patient (those recorded)."""
    rows = ["| trained on (+ 3x as many phantom slices) | tested on, inside the liver | Dice | clDice | "
            "pieces predicted / true |", "|---|---|---|---|---|"]
    names = [n for n in REAL_RECIPE_RECORDS if (RESULTS_DIR / f"{n}.json").is_file()]
    for n in names:
        r = record(n)["numbers"]
        m = r["metrics"]
        rows.append(f"| {REAL_RECIPE_RECORDS[n]} | {', '.join(r['cases'])} | {_fmt(m['dice']['mean'])} | "
                    f"{_fmt(m['cldice']['mean'])} | {m['components_pred']['mean']:.0f} / "
                    f"{m['components_true']['mean']:.0f} |")
    return "\n".join(rows) + "\n\n" + source(*names) + "\n"


#: scripts/real_curves.sh's axes: record suffix -> what the rows vary (and what stays fixed)
CURVE_AXES = {
    "iterations": "iterations (16 channels, as many phantom slices as real ones, offline salience)",
    "phantoms": "phantom slices per real slice (1500 iterations)",
    "width": "base channels (the chosen setting: 1500 iterations, 3x phantoms)",
    "salience": "salience (the chosen setting; seeds 0, 1, 2 averaged per patient, pooled in \"both\")",
}


def _test_patient(case: str) -> str:
    m = re.fullmatch(r"case0*(\d+)", case)
    return m.group(1) if m else case


def real_curves() -> str:
    """scripts/real_curves.sh's records (results/real_curves_<axis>.json): per setting, Dice, clDice
    and pieces on each real patient (trained on the other), and both pooled with their 95% CI."""
    from evaluation.compare import curve_series
    from evaluation.reports import summarize

    def both(vals: list) -> str:
        st = summarize([{"v": v} for v in vals], ["v"])["v"]
        ci = f" [{st['ci95_low']:.3f}, {st['ci95_high']:.3f}]" if st["n"] > 1 else ""
        return f"{st['mean']:.3f}{ci}" if st["n"] else "n/a"

    def cell(v: float, digits: int = 3) -> str:
        return "n/a" if v != v else f"{v:.{digits}f}"

    out, names = [], []
    for axis, what in CURVE_AXES.items():
        name = f"real_curves_{axis}"
        if not (RESULTS_DIR / f"{name}.json").is_file():
            continue
        names.append(name)
        rows = record(name)["numbers"]["rows"]
        labels, dice, dice_all = curve_series(rows, "dice")
        _, cl, cl_all = curve_series(rows, "cldice")
        _, pred, _ = curve_series(rows, "components_pred")
        _, true, _ = curve_series(rows, "components_true")
        cases = list(dice)
        on = [f"on {_test_patient(c)}" for c in cases]
        head = ([what] + [f"Dice {o}" for o in on] + ["Dice, both [95% CI]"] + [f"clDice {o}" for o in on]
                + ["clDice, both [95% CI]"] + [f"pieces {o} (truth)" for o in on])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        def at(per: dict, c: str, i: int) -> float:  # a case without any value of this metric: NaN
            return per[c][i] if c in per else math.nan

        for i, label in enumerate(labels):
            cells = ([label] + [cell(dice[c][i]) for c in cases] + [both(dice_all[i])]
                     + [cell(at(cl, c, i)) for c in cases] + [both(cl_all[i])]
                     + [f"{cell(at(pred, c, i), 0)} ({cell(at(true, c, i), 0)})" for c in cases])
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines) + "\n")
    if not names:
        return ("Not measured yet: `RECORD=real_curves bash scripts/real_curves.sh` writes "
                "`results/real_curves_<axis>.json`.\n")
    return "\n".join(out) + "\n" + source(*names) + "\n"


RENDERERS: dict[str, Callable[[], str]] = {
    "real-curves": real_curves,
    "real-recipe": real_recipe,
    "gpu-records": gpu_records,
    "extent-invariance": extent_invariance,
    "demo-phantom": demo_phantom,
    "headline": headline,
    "tree-headline": tree_headline,
    "tree-headline-docs": lambda: tree_headline("../"),
    "liver-recipes": liver_recipes,
    "demo-time": demo_time,
    "predict-speed": predict_speed,
    "predict-speed-extras": lambda: predict_speed("predict_bench_extras"),
    "predict-speed-trees": lambda: predict_speed("predict_bench_trees"),
    "predict-speed-branches": lambda: predict_speed("predict_bench_branches"),
    "predict-speed-branches-one-thread": lambda: predict_speed("predict_bench_branches_one_thread"),
    "predict-speed-liver": lambda: predict_speed("predict_bench_liver"),
    **{f"flags-{m}": (lambda m=m: _flag_table(m)) for m in COMMANDS},
}


def render_text(text: str, where: str = "document") -> str:
    """``text`` with every rendered block replaced; ValueError for an unknown block name."""
    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name.startswith("table-"):  # any record that carries its own table (bench scripts' --record)
            return m.group(1) + table_record(name[len("table-"):]) + m.group(4)
        if name not in RENDERERS:
            raise ValueError(f"{where}: unknown rendered block {name!r}; known: {', '.join(sorted(RENDERERS))}")
        return m.group(1) + RENDERERS[name]() + m.group(4)

    return BLOCK.sub(fill, text)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check: exit 1 when a document is not up to date")
    args = p.parse_args(argv)
    stale = []
    for rel in DOCUMENTS:
        path = ROOT / rel
        if not path.is_file():
            continue
        old = path.read_text()
        new = render_text(old, rel)
        if new != old:
            stale.append(rel)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"not up to date (run python scripts/render_docs.py): {', '.join(stale)}")
        return 1
    print(("rendered: " + ", ".join(stale)) if stale and not args.check else "documents up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
