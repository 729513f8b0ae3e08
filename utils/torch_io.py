"""Reading .pth files with one error convention: a one-line message naming the file."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch


def load_torch_file(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> object:
    """``torch.load(path, weights_only=True)``.

    Raises FileNotFoundError ("<path>: <what> not found") or ValueError ("<path>: not a
    readable torch file (...)") so every caller reports bad input the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many unrelated types for a bad file
        # torch's own message for a file it cannot read safely advises weights_only=False, which would
        # run a stranger's pickled code: say what the file is instead
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a torch file (torch.save writes a zip archive; this is not one)") from None
        if isinstance(e, pickle.UnpicklingError):
            raise ValueError(f"{path}: a torch file holding objects a weights-only load refuses: not a file this "
                             "project writes") from None
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {first})") from None
