"""Atomic file and folder writes: a crash never leaves a half-written output behind.

Every stage writes to a temporary name beside the final one and renames it when
complete (``os.replace`` is atomic on one file system).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path; on success rename it to ``final``.

    On any exception the temporary file is removed and ``final`` is untouched.
    With ``overwrite=False`` an existing ``final`` raises ``FileExistsError``.
    """
    final = Path(final)
    if not overwrite and final.exists():
        raise FileExistsError(f"{final}: exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``final`` as a whole."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
