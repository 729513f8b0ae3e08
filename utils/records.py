"""Result records: one small JSON file per measured run, the source of every published figure.

``write_record(name, numbers, ...)`` writes ``results/<name>.json`` with the command that made
it, the code version, the machine and the date beside the numbers; the documentation's tables
are rendered from these files, never typed by hand.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

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


def write_record(name: str, numbers: dict[str, Any], *, description: str, inputs: Optional[dict] = None,
                 command: Optional[str] = None, folder: Path = RESULTS_DIR, code: Optional[str] = None) -> Path:
    """Write ``<folder>/<name>.json`` atomically; returns its path.

    ``numbers``: the measured values (JSON-able), ``description``: one sentence saying what
    was measured, ``inputs``: what it was measured on (model file hash, data), ``command``:
    defaults to this process's command line; ``code``: the code version that measured them
    (default: this checkout's, ``utils.provenance.code_version``).
    """
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
