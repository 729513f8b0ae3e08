"""Reading .pth files with one error convention: a one-line message naming the file."""
from __future__ import annotations

import os
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
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {first})") from None
