"""How long ``make demo`` takes from a clean checkout, stage by stage (the README's promise:
under 10 minutes on 2 CPU cores).

    python bench/demo_time.py [--runs 3] [--record NAME]

Each run clones the repository's committed HEAD into a new temporary folder (so nothing a
previous demo left is reused, and the time belongs to a commit) and runs ``bash
scripts/demo.sh`` there with this interpreter (``PY``): what ``make demo`` does once ``make
setup`` has installed the environment, whose install is not timed (it depends on the network
and the pip cache). ``../shared`` is not read: the demo uses phantoms only.

The stages are the ``== [N s] <stage>`` lines on the demo's standard output (those of
``prepare_phantom.sh`` among them; ``train_liver.sh`` and ``train_tree_model.sh`` print theirs on
standard error, so they fall within the demo's stage); each is timed here, from the moment its
line is printed to the next stage's, on this process's clock (:func:`stage_times`). Prints the
machine, the per-stage medians over ``--runs`` runs and the total; ``--record NAME`` writes ``results/NAME.json``
(utils.records). The demo's own settings (``DEMO_*`` variables) are removed from its
environment, so the default demo is what is timed. A failed run stops the bench with the
demo's exit code and the path of its kept log.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.logging_setup import setup_logging  # noqa: E402
from utils.provenance import version_of  # noqa: E402
from utils.records import check_new_record  # noqa: E402

log = logging.getLogger("bench")
STAGE = re.compile(r"^== \[\d+ s\] (.+)$")


def stage_times(lines: Iterable[tuple[float, str]], end: float) -> list[tuple[str, float]]:
    """(stage, seconds) from the demo's output: ``lines`` are (time in s, line) in the order
    printed; a line ``== [N s] <stage>`` starts a stage, which lasts until the next one starts
    or until ``end``. Time before the first stage is not a stage. ValueError when the times go
    backwards or the output holds no stage."""
    out: list[tuple[str, float]] = []
    current: Optional[tuple[str, float]] = None
    last = float("-inf")
    for t, line in lines:
        if t < last:
            raise ValueError(f"output times go backwards ({t} after {last})")
        last = t
        m = STAGE.match(line.strip())
        if m is None:
            continue
        if current is not None:
            out.append((current[0], t - current[1]))
        current = (m.group(1).strip(), t)
    if current is None:
        raise ValueError("the demo printed no '== [N s] <stage>' line")
    if end < last:
        raise ValueError(f"end {end} before the last output line at {last}")
    out.append((current[0], end - current[1]))
    return out


def run_demo(python: str, workdir: Path) -> tuple[float, list[tuple[str, float]]]:
    """One ``make demo`` in a fresh clone of HEAD under ``workdir``: (total seconds, stages).
    RuntimeError naming the exit code and ``workdir``'s log when the demo fails."""
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    err_path = workdir / "demo_stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    env["PY"] = python
    stamped: list[tuple[float, str]] = []
    with open(err_path, "w") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            stamped.append((time.monotonic() - t0, line.rstrip("\n")))
            if STAGE.match(line.strip()):
                log.info("%6.0f s  %s", stamped[-1][0], line.strip())
        code = proc.wait()
        total = time.monotonic() - t0
    if code != 0:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"scripts/demo.sh failed with exit code {code} (log: {err_path}): " + " | ".join(tail))
    return total, stage_times(stamped, total)


def medians(runs: Sequence[tuple[float, list[tuple[str, float]]]]) -> tuple[float, list[tuple[str, float]]]:
    """Per-stage and total medians over runs; ValueError when the runs' stages differ."""
    names = [s for s, _ in runs[0][1]]
    for _, stages in runs[1:]:
        if [s for s, _ in stages] != names:
            raise ValueError("the runs printed different stages: " + str([s for s, _ in stages]))
    per = [statistics.median(stages[k][1] for _, stages in runs) for k in range(len(names))]
    return statistics.median(t for t, _ in runs), list(zip(names, per))


def table(runs: Sequence[tuple[float, list[tuple[str, float]]]],
          summary: tuple[float, list[tuple[str, float]]]) -> list[str]:
    """Markdown lines: one row per stage, median and each run's seconds, then the total;
    ``summary`` is :func:`medians` of ``runs``."""
    total, per = summary
    head = "| stage | median s | " + " | ".join(f"run {k + 1} s" for k in range(len(runs))) + " |"
    out = [head, "|---" * (len(runs) + 2) + "|"]
    for k, (name, med) in enumerate(per):
        cells = " | ".join(f"{stages[k][1]:.0f}" for _, stages in runs)
        out.append(f"| {name.replace('|', '/')} | {med:.0f} | {cells} |")
    out.append(f"| **total** | **{total:.0f}** | " + " | ".join(f"{t:.0f}" for t, _ in runs) + " |")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="demos to run, each in a fresh clone (median reported)")
    p.add_argument("--record", default=None, metavar="NAME",
                   help="also write results/NAME.json (utils.records)")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error(f"--runs must be at least 1, got {a.runs}")
    from utils.records import write_record

    results = ROOT / "results"
    if a.record:
        try:
            check_new_record(a.record, results)
        except ValueError as e:
            p.error(str(e))
    setup_logging(logging.INFO)
    version = version_of(ROOT)
    if version.endswith("-dirty"):
        log.warning("the working tree has changes: the demo runs HEAD (%s) without them", version[:-6])
    commit = version.removesuffix("-dirty")
    dropped = sorted(k for k in os.environ if k.startswith("DEMO_"))
    if dropped:
        log.warning("timing the default demo: %s not passed on", ", ".join(dropped))
    runs = []
    for _ in tqdm(range(a.runs), desc="make demo", unit="run"):
        work = Path(tempfile.mkdtemp(prefix="demo_time_"))
        try:
            runs.append(run_demo(sys.executable, work))
        except (RuntimeError, ValueError, subprocess.CalledProcessError) as e:
            log.error("%s", e)  # the folder, and the demo's log in it, are kept
            return 1
        shutil.rmtree(work)
    try:
        summary = medians(runs)
    except ValueError as e:
        log.error("%s", e)
        return 1
    total, per = summary
    lines = table(runs, summary)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPU cores; commit {commit[:10]}; {a.runs} run(s)")
    print("\n".join(lines))
    if a.record:
        try:  # write_record refuses a name taken while the demo ran
            path = write_record(a.record, {"total_s": total, "runs_total_s": [t for t, _ in runs],
                                           "stages": [{"stage": s, "median_s": m} for s, m in per],
                                           "table_markdown": lines},
                                description=(f"wall time of make demo's scripts/demo.sh in a fresh clone of commit "
                                             f"{commit[:10]}, the environment already installed, per stage (the "
                                             f"demo's '== [N s]' lines) and in total; median of {a.runs} run(s)"),
                                inputs={"runs": a.runs, "commit": commit}, code=commit, folder=results)
        except ValueError as e:
            log.error("appeared while the demo ran: %s", e)
            return 1
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
