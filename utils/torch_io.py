"""Reading .pth files with one error convention: a one-line message naming the file."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch


#: how torch.save's files begin: a zip archive (torch 1.6 and later), or the older format's magic number
_ZIP_HEAD = b"PK\x03\x04"
_LEGACY_HEAD = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _torch_file_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be a torch file, or None when it may be one."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_HEAD))
    if head.startswith(_ZIP_HEAD):
        return None if zipfile.is_zipfile(path) else "a damaged torch file (a zip archive without its end: a " \
                                                      "download or copy cut short?)"
    if head.startswith(_LEGACY_HEAD):
        return None
    return "not a torch file (neither the zip archive torch.save writes nor torch's older format)"


def load_torch_file(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> object:
    """``torch.load(path, weights_only=True)``.

    Raises FileNotFoundError ("<path>: <what> not found") or ValueError ("<path>: <what is wrong>":
    not a torch file, a damaged one, one holding objects a weights-only load refuses, or torch's
    own first line) so every caller reports bad input the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many unrelated types for a bad file
        # torch's own message for a file it cannot read safely advises weights_only=False, which would
        # run a stranger's pickled code: say what the file is instead
        problem = _torch_file_problem(path)
        if problem:
            raise ValueError(f"{path}: {problem}") from None
        if isinstance(e, pickle.UnpicklingError):
            raise ValueError(f"{path}: a torch file holding objects a weights-only load refuses: not a file this "
                             "project writes") from None
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {first})") from None
