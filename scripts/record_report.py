"""Publish a test.py report as a result record (results/<name>.json) the docs are rendered from.

    python scripts/record_report.py --name demo_phantom --report checkpoint/phantom/.../demo/eval_test \
        --command "make demo"

The record keeps the code version that made the report (its provenance), the report's summary (mean, std, 95% CI per metric), the model file's hash,
salience mode, normalisation rule and iterations, the report's provenance (options, code
version) and the machine; ``--command`` says what produced the report. An existing record
of that name is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.records import RESULTS_DIR, write_record  # noqa: E402


def record_report(name: str, report: Path, command: str, overwrite: bool = False,
                  folder: Path = RESULTS_DIR) -> Path:
    """Write ``folder/<name>.json`` from the test.py report folder ``report``; returns its path."""
    import torch  # the model file says how it was trained

    summary_path = Path(report) / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: no test.py report there")
    if (Path(folder) / f"{name}.json").exists() and not overwrite:
        raise FileExistsError(f"{Path(folder) / f'{name}.json'}: exists (pass --overwrite to replace it)")
    doc = json.loads(summary_path.read_text())
    meta = doc["meta"]
    ckpt = torch.load(meta["model_path"], map_location="cpu", weights_only=True)
    gen = ckpt.get("generator") or {}
    numbers = {
        "metrics": doc["metrics"], "n_cases": meta["n_cases"], "cases": meta["cases"], "split": meta["split"],
        "eval_roi": meta["eval_roi"], "salience": meta["salience"],
        "normalisation": gen.get("normalisation", "volume") if meta["salience"] == "offline" else None,
        "iterations": ckpt.get("iteration"), "model_name": meta["model_name"], "model_kwargs": meta["model_kwargs"],
    }
    return write_record(name, numbers, description=f"test.py report of {meta['dataset']} / {meta['split']}",
                        inputs={"model_sha256": meta["model_sha256"], "report": str(report),
                                "provenance": meta.get("provenance")},
                        command=command, folder=folder, overwrite=overwrite,
                        code=(meta.get("provenance") or {}).get("code_version") or meta.get("code_version"))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--report", required=True, help="a test.py report folder (with summary.json)")
    p.add_argument("--command", required=True, help="what produced the report, e.g. 'make demo'")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        print(record_report(args.name, Path(args.report), args.command, args.overwrite))
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
