"""Result records: one small JSON file per measured run, the source of every published figure.

``write_record(name, numbers, ...)`` writes ``results/<name>.json`` with the command that made
it, the code version, the machine and the date beside the numbers; the documentation's tables
are rendered from these files, never typed by hand.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import io
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from utils.atomic import atomic_path
from utils.provenance import code_version, read_json_doc

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
RECORD_FORMAT = "livervessel-record-v1"


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: OS, CPU, cores, Python and torch, GPU if any."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def check_record_name(name: str) -> None:
    """ValueError unless ``name`` can be a record's name (it becomes ``results/<name>.json``)."""
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"record name {name!r}: use letters, digits, '_', '-' and '.' (it becomes results/<name>.json)")


def check_new_record(name: str, folder: Path = RESULTS_DIR) -> str:
    """``name`` when it can name a new record: ValueError for a name :func:`check_record_name` refuses
    or one whose ``<folder>/<name>.json`` exists (records are never overwritten: a measurement
    again gets a new name, or its old file is deleted by hand). Bench scripts call it before
    measuring (:func:`new_record_arg`), so a taken name fails in seconds, not after the run."""
    check_record_name(name)
    path = Path(folder) / f"{name}.json"
    if path.exists():
        raise ValueError(f"{path} exists: records are never overwritten; choose another record name (or delete the "
                         f"file to measure it again)")
    return name


def new_record_arg(name: str) -> str:
    """argparse ``type`` of a script's ``--record NAME``: :func:`check_new_record` on the default
    results folder, its message shown as the usage error."""
    try:
        return check_new_record(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def write_record(name: str, numbers: dict[str, Any], *, description: str, inputs: Optional[dict] = None,
                 command: Optional[str] = None, folder: Path = RESULTS_DIR, code: Optional[str] = None,
                 overwrite: bool = False) -> Path:
    """Write ``<folder>/<name>.json`` atomically, refusing (ValueError) a name whose file exists
    unless ``overwrite`` (a user's explicit ``--overwrite``); returns its path.

    ``numbers``: the measured values (JSON-able), ``description``: one sentence saying what
    was measured, ``inputs``: what it was measured on (model file hash, data), ``command``:
    defaults to this process's command line; ``code``: the code version that measured them
    (default: this checkout's, ``utils.provenance.code_version``).
    """
    if overwrite:
        check_record_name(name)
    else:
        check_new_record(name, folder)
    doc = {
        "format": RECORD_FORMAT,
        "name": name,
        "description": description,
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "code_version": code or code_version(),
        "machine": machine(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "inputs": inputs or {},
        "numbers": numbers,
    }
    path = Path(folder) / f"{name}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A record written by :func:`write_record`; ValueError naming the file when it is not one."""
    return read_json_doc(path, RECORD_FORMAT, "record")


class _Tee(io.TextIOBase):
    """Writes to ``stream`` and keeps a copy."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.parts = stream, []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


def run_recorded(main_fn: Callable[..., Any], description: str, argv: Optional[list[str]] = None,
                 folder: Optional[Path] = None) -> int:
    """Run a bench script's ``main`` and, when the command line has ``--record NAME``, write what it
    printed as ``results/NAME.json``: its Markdown table lines (``numbers.table_markdown``, what the
    docs render) and every printed line (``numbers.printed``).

    ``--record NAME`` is taken off the command line before ``main_fn`` parses it; ``main_fn`` is
    called with the rest (as ``main_fn(argv)`` when it takes an argument, else with ``sys.argv`` set).
    Nothing is written when the script fails or prints no table.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = None
    if "--record" in argv:
        i = argv.index("--record")
        if i + 1 >= len(argv):
            raise SystemExit("--record needs a NAME (results/NAME.json)")
        name = argv[i + 1]
        del argv[i:i + 2]
        try:
            check_new_record(name, folder or RESULTS_DIR)
        except ValueError as e:
            raise SystemExit(f"--record: {e}") from None
    takes_argv = bool(inspect.signature(main_fn).parameters)
    tee = _Tee(sys.stdout)
    old_argv, old_stdout = sys.argv, sys.stdout
    sys.argv, sys.stdout = [sys.argv[0], *argv], tee
    try:
        rc = main_fn(argv) if takes_argv else main_fn()
    finally:
        sys.argv, sys.stdout = old_argv, old_stdout
    rc = int(rc or 0)
    if name and rc == 0:
        printed = "".join(tee.parts).splitlines()
        table = [line for line in printed if line.startswith("|")]
        if not table:
            print(f"--record {name}: the script printed no table; nothing recorded", file=sys.stderr)
            return 1
        path = write_record(name, {"table_markdown": table, "printed": printed}, description=description,
                            inputs={"argv": argv}, command=" ".join([Path(old_argv[0]).name, *old_argv[1:]]),
                            folder=folder or RESULTS_DIR)
        print(f"record: {path}")
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m utils.records NAME...``: exit 2 with one line when a name cannot name a new record
    (taken or malformed); the shell scripts that end in ``--record`` check their names so before
    hours of training, not after."""
    for name in sys.argv[1:] if argv is None else argv:
        try:
            check_new_record(name)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
