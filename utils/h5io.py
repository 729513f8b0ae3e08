"""The project's on-disk HDF5 layout (docs/DESIGN.md section 2), read and written in one place.

Layout under ``<root>/<dataset>/``::

    vol_data/<case>.h5       image float32 (H, W, D) in [0, 1]; label uint8 (H, W, D);
                             liver uint8 (H, W, D) optional; attrs spacing (mm, row/col/slice),
                             hu_window, crop (6 ints), source
    vol_salience/<case>.h5   salience float32 (3, H, W, D) in [0, 1]; attrs generator, weights_sha256
    slice_data/<case>_slice<NNNN>.h5   image (H, W), label (H, W), salience (3, H, W) optional

Lists live under ``<list_dir>/<dataset>/`` (vol_train.txt, vol_val.txt, vol_test.txt,
slice_train.txt), one name a line. Files from the authors' release lack some
attributes; readers fill documented defaults (spacing 1 mm) and say so.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np

from utils.atomic import atomic_path

log = logging.getLogger(__name__)

HU_WINDOW = (0.0, 400.0)
SPLITS = ("train", "val", "test")
# gzip level 1 without shuffle: on a 512 x 512 x 131 phantom it writes in half the time of
# level 4 + shuffle and the file is smaller (14 vs 20 MB), because the clipped image has
# long runs of exact 0 and 1 that shuffle breaks up.
_COMPRESSION = dict(compression="gzip", compression_opts=1, shuffle=False)


@dataclass(frozen=True)
class DatasetPaths:
    """Folders of one dataset: ``root/<dataset>/{vol_data,vol_salience,slice_data}`` and its lists."""

    root: Path
    list_dir: Path

    @classmethod
    def of(cls, root_path: str | os.PathLike, dataset: str, list_dir: str | os.PathLike = "list") -> "DatasetPaths":
        return cls(Path(root_path) / dataset, Path(list_dir) / dataset)

    @property
    def vol_data(self) -> Path:
        return self.root / "vol_data"

    @property
    def vol_salience(self) -> Path:
        return self.root / "vol_salience"

    @property
    def slice_data(self) -> Path:
        return self.root / "slice_data"

    def volume(self, case: str) -> Path:
        return self.vol_data / f"{case}.h5"

    def salience(self, case: str) -> Path:
        return self.vol_salience / f"{case}.h5"

    def slice(self, name: str) -> Path:
        return self.slice_data / f"{name}.h5"

    def list_file(self, name: str) -> Path:
        """``name`` is e.g. ``vol_train`` or ``slice_train``."""
        return self.list_dir / f"{name}.txt"


def slice_name(case: str, index: int) -> str:
    """``<case>_slice<NNNN>``: the slice file of index ``index`` along D of the stored volume."""
    return f"{case}_slice{index:04d}"


_SLICE_NAME = re.compile(r"^(?P<case>.+)_slice(?P<z>\d+)$")


def parse_slice_name(name: str) -> tuple[str, int]:
    """(case, slice index) of ``<case>_slice<NNNN>``, the inverse of :func:`slice_name`."""
    m = _SLICE_NAME.match(name)
    if m is None:
        raise ValueError(f"slice name must be <case>_slice<NNNN>, got {name!r}")
    return m.group("case"), int(m.group("z"))


@dataclass
class Volume:
    """One case. Arrays are (H, W, D) = (rows, columns, slices); spacing in mm, same order."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    liver: Optional[np.ndarray] = None
    crop: Optional[tuple[int, ...]] = None
    source: str = ""
    hu_window: tuple[float, float] = HU_WINDOW
    attrs: dict = field(default_factory=dict)
    #: uint8 (H, W, D) class map (0 background, 1.. the classes of attrs["class_names"]) or None
    classes: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise ValueError(f"image must be (H, W, D), got shape {self.image.shape}")
        for name in ("label", "liver", "classes"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != self.image.shape:
                raise ValueError(f"{name} shape {arr.shape} differs from image shape {self.image.shape}")


def write_volume(path: str | os.PathLike, vol: Volume, overwrite: bool = True) -> None:
    """Write ``vol`` atomically; chunks are one transverse slab so a slice reads fast."""
    h, w, d = vol.image.shape
    chunks = (h, w, 1)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            arrays = {"image": vol.image.astype(np.float32), "label": vol.label.astype(np.uint8)}
            if vol.liver is not None:
                arrays["liver"] = vol.liver.astype(np.uint8)
            if vol.classes is not None:
                arrays["classes"] = vol.classes.astype(np.uint8)
            for name, arr in arrays.items():
                dset = f.create_dataset(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks, **_COMPRESSION)
                # one chunk at a time: h5py then skips a full-array copy into chunk order
                for z in range(d):
                    dset[:, :, z] = arr[:, :, z]
            f.attrs["spacing"] = np.asarray(vol.spacing, dtype=np.float64)
            f.attrs["hu_window"] = np.asarray(vol.hu_window, dtype=np.float64)
            if vol.crop is not None:
                f.attrs["crop"] = np.asarray(vol.crop, dtype=np.int64)
            f.attrs["source"] = str(vol.source)
            for k, v in vol.attrs.items():
                f.attrs[k] = v


def read_volume(path: str | os.PathLike, with_liver: bool = True) -> Volume:
    """Read a ``vol_data`` file (ours or the authors'); raises ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: volume file not found")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or "label" not in f:
                raise ValueError(f"{path}: needs datasets 'image' and 'label', has {sorted(f.keys())}")
            image = f["image"][()].astype(np.float32)
            label = f["label"][()].astype(np.uint8)
            liver = f["liver"][()].astype(np.uint8) if (with_liver and "liver" in f) else None
            classes = f["classes"][()].astype(np.uint8) if "classes" in f else None
            attrs = dict(f.attrs)
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None
    if image.shape != label.shape:
        raise ValueError(f"{path}: label shape {label.shape} differs from image shape {image.shape}")
    if image.ndim != 3:
        raise ValueError(f"{path}: image must be 3-D (H, W, D), got shape {image.shape}")
    spacing = attrs.pop("spacing", None)
    if spacing is None:
        log.warning("%s: no spacing attribute, assuming 1 mm", path)
        spacing = (1.0, 1.0, 1.0)
    crop = attrs.pop("crop", None)
    return Volume(
        image=image,
        label=label,
        spacing=tuple(float(s) for s in spacing),
        liver=liver,
        crop=None if crop is None else tuple(int(c) for c in crop),
        source=str(attrs.pop("source", "")),
        hu_window=tuple(float(x) for x in attrs.pop("hu_window", HU_WINDOW)),
        attrs=attrs,
        classes=classes,
    )


def write_salience(
    path: str | os.PathLike, salience: np.ndarray, generator: str, weights_sha256: str = "", overwrite: bool = True,
    normalisation: str = "volume", volume_sha256: str = "",
) -> None:
    """Write a (3, H, W, D) salience map atomically; attrs generator, weights_sha256, normalisation
    and, when given, the sha256 of the volume file it was made from."""
    if salience.ndim != 4 or salience.shape[0] != 3:
        raise ValueError(f"salience must be (3, H, W, D), got shape {salience.shape}")
    h, w = salience.shape[1:3]
    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("salience", data=salience.astype(np.float32), chunks=(3, h, w, 1), **_COMPRESSION)
            f.attrs["generator"] = generator
            f.attrs["weights_sha256"] = weights_sha256
            f.attrs["normalisation"] = normalisation
            if volume_sha256:
                f.attrs["volume_sha256"] = volume_sha256


def salience_made_by(path: str | os.PathLike) -> tuple[str, str, str]:
    """(generator, weights sha256, normalisation) recorded in the salience file at ``path``
    ("" where not recorded; normalisation "volume" for files from before the rule was recorded)."""
    with h5py.File(path, "r") as f:
        return (str(f.attrs.get("generator", "")), str(f.attrs.get("weights_sha256", "")),
                str(f.attrs.get("normalisation", "volume")))


def salience_volume_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the volume file a salience map was made from ("" for maps from before it was
    recorded, or the authors')."""
    with h5py.File(path, "r") as f:
        return str(f.attrs.get("volume_sha256", ""))


def apply_hu_window(hu: np.ndarray, window: Sequence[float] = HU_WINDOW) -> np.ndarray:
    """The network's image: HU clipped to ``window`` and divided by its width, float32 in [0, 1]."""
    lo, hi = (float(v) for v in window)
    return np.clip(hu, np.float32(lo), np.float32(hi)) / np.float32(hi - lo)


def read_salience(path: str | os.PathLike) -> np.ndarray:
    """Read a (3, H, W, D) salience map."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: salience file not found (run salience_generation.py first)")
    with h5py.File(path, "r") as f:
        if "salience" not in f:
            raise ValueError(f"{path}: no 'salience' dataset (has {sorted(f.keys())})")
        s = f["salience"][()].astype(np.float32)
    if s.ndim != 4 or s.shape[0] != 3:
        raise ValueError(f"{path}: salience must be (3, H, W, D), got shape {s.shape}")
    return s


def write_slice(
    path: str | os.PathLike,
    image: np.ndarray,
    label: np.ndarray,
    salience: Optional[np.ndarray] = None,
    overwrite: bool = True,
    classes: Optional[np.ndarray] = None,
) -> None:
    """Write one 2-D training slice: image (H, W), label (H, W), salience (3, H, W) and class map
    (H, W) optional."""
    if image.ndim != 2 or label.shape != image.shape:
        raise ValueError(f"slice image/label must be (H, W) of one shape, got {image.shape} / {label.shape}")
    if salience is not None and salience.shape != (3,) + image.shape:
        raise ValueError(f"slice salience must be (3, H, W) = {(3,) + image.shape}, got {salience.shape}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("image", data=image.astype(np.float32), **_COMPRESSION)
            f.create_dataset("label", data=label.astype(np.uint8), **_COMPRESSION)
            if salience is not None:
                f.create_dataset("salience", data=salience.astype(np.float32), **_COMPRESSION)
            if classes is not None:
                f.create_dataset("classes", data=classes.astype(np.uint8), **_COMPRESSION)


def read_list(path: str | os.PathLike) -> list[str]:
    """Names in a list file, one a line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: list file not found")
    names = [ln.strip() for ln in path.read_text().splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def write_list(path: str | os.PathLike, names: Sequence[str], overwrite: bool = True) -> None:
    """A list file: one name a line, written atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text("".join(f"{n}\n" for n in names))
