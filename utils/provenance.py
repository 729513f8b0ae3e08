"""What made an output: the model file's hash, the options that change a number, the code version.

Every report ``test.py`` writes (``summary.json``) and every ``<case>_stats.json`` of
``predict.py`` carries a :func:`record` under the key ``"provenance"``. An output is reused
only when :func:`mismatches` finds nothing between the stored record and the one the current
command would write; otherwise it is computed again and the log says which field differs.
The record's ``created`` date is informative and never compared.

No torch here: the stages below the networks import it too.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

#: the keys of a record that must agree for an output to be reused
COMPARED = ("model_sha256", "options", "code_version")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of what ``path`` holds: a file's bytes, or a folder's files (each one's path
    relative to the folder and its bytes, in sorted order), e.g. a DICOM series folder."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + b"\0" + bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


#: what the repository keeps of its outputs (measured records, the documents rendered from them):
#: writing a record must not make the code that measured the next one read as changed
OUTPUT_PATHS = ("results", "docs", "README.md")


def _git(root: str | os.PathLike, *args: str) -> Optional[str]:
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def version_of(root: str | os.PathLike) -> str:
    """The git commit checked out at ``root`` (``<sha>``), with ``-dirty`` when a tracked file
    outside :data:`OUTPUT_PATHS` differs from it; "unknown" outside a git checkout."""
    sha = _git(root, "rev-parse", "HEAD")
    if not sha:
        return "unknown"
    changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                   *[f":(exclude){p}" for p in OUTPUT_PATHS])
    return sha + ("-dirty" if changed is None or changed else "")


#: where backbones are dropped in (networks.registry imports every module there)
PLUGINS = "networks/plugins"


def untracked_plugins(root: str | os.PathLike) -> dict[str, str]:
    """{path from ``root``: sha256} of the files under networks/plugins/ that git neither tracks nor
    ignores (a plug-in module or package: code that trains and runs models but that the commit does
    not name); hidden names (editor lock files, macOS ``._`` files) and unreadable entries are left
    out. {} outside a git checkout."""
    root = Path(root)
    listed = _git(root, "ls-files", "--others", "--exclude-standard", "--", PLUGINS)
    if not listed:
        return {}
    out = {}
    for rel in sorted(listed.splitlines()):
        path = root / rel
        if any(part.startswith(".") for part in Path(rel).parts) or not path.is_file():
            continue
        try:
            out[rel] = file_sha256(path)
        except OSError:  # gone or unreadable since git listed it: not code that runs
            continue
    return out


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """:func:`code_version_of` this code."""
    return code_version_of(Path(__file__).resolve().parents[1])


def code_version_of(root: str | os.PathLike) -> str:
    """The git commit at ``root`` (``<sha>`` or ``<sha>-dirty``, see :func:`version_of`), then
    ``+plugins-<hash>`` when untracked plug-in backbones are present (the hash of their sources,
    so a report or model made before one was edited reads as made by other code); "unknown"
    outside a git checkout."""
    version = version_of(root)
    extra = untracked_plugins(root) if version != "unknown" else {}
    if extra:
        digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()
        version += f"+plugins-{digest[:12]}"
    return version


def read_json_doc(path: str | os.PathLike, fmt: str, what: str) -> dict:
    """The JSON object at ``path`` whose ``format`` is ``fmt``; ValueError naming the file when it
    is unreadable or of another format (``what`` names the kind of file in the message)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON {what} ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} {what}")
    return doc


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings), so that a stored
    record and a fresh one compare equal when they describe the same thing."""
    return json.loads(json.dumps(value, default=str))


def record(model_sha256: str, options: dict[str, Any]) -> dict[str, Any]:
    """The provenance of one output: model hash, every number-changing option, code version, date."""
    return {
        "model_sha256": str(model_sha256),
        "options": _plain(options),
        "code_version": code_version(),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def mismatches(stored: Optional[dict], wanted: dict) -> list[str]:
    """Why an output with provenance ``stored`` is not the one ``wanted`` describes ([] when it is).

    An output without a record (written before records existed) never matches. Each item
    reads "field: stored vs now"; options are compared one by one.
    """
    if not isinstance(stored, dict):
        return ["no provenance record (written by an older version)"]
    out = []
    for key in COMPARED:
        if key == "options":
            old, new = stored.get("options") or {}, wanted.get("options") or {}
            for name in sorted(set(old) | set(new)):
                if old.get(name) != new.get(name):
                    out.append(f"{name}: {old.get(name)!r} vs {new.get(name)!r} now")
        elif stored.get(key) != wanted.get(key):
            a, b = str(stored.get(key)), str(wanted.get(key))
            out.append(f"{key}: {a[:12]} vs {b[:12]} now")
    return out
