"""Shared fixtures: a tiny dataset in the project's HDF5 layout (docs/DESIGN.md section 2).

``tiny_dataset`` writes, under a temporary root, five 32 x 32 x 12 cases with two
straight vessels (a tube along the slice axis and a diagonal one), a liver mask,
stand-in salience maps (so training can be tested before a generator runs), slice
files for the training cases and the four list files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from utils import threads
from utils.h5io import DatasetPaths, Volume, slice_name, write_list, write_salience, write_slice, write_volume

REAL_SERIES = Path(__file__).resolve().parents[1].parent / "shared" / "real" / "3Dircadb1.1" / "PATIENT_DICOM"
SEED_WEIGHTS = (
    Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "dice_best_Wavelet_square_net_vessel_data_size512.pth"
)


@dataclass
class TinyDataset:
    root_path: Path
    list_dir: Path
    dataset: str
    paths: DatasetPaths
    splits: dict


def tiny_volume(seed: int, shape=(32, 32, 12)) -> Volume:
    rng = np.random.default_rng(seed)
    h, w, d = shape
    r, c, s = np.meshgrid(np.arange(h), np.arange(w), np.arange(d), indexing="ij")
    cr, cc = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3)
    liver = ((r - h / 2) ** 2 / (0.42 * h) ** 2 + (c - w / 2) ** 2 / (0.42 * w) ** 2) <= 1
    tube_a = (r - cr) ** 2 + (c - cc) ** 2 <= 2.0**2
    # a diagonal vessel in every slice: distance to the line r = c + off
    off = rng.uniform(-4, 4)
    tube_b = np.abs(r - c - off) / np.sqrt(2) <= 1.2
    label = ((tube_a | tube_b) & liver).astype(np.uint8)
    image = 0.25 * liver + 0.2 * label + rng.normal(0, 0.02, shape)
    image = np.clip(image, 0, 1).astype(np.float32)
    return Volume(image=image, label=label, liver=liver.astype(np.uint8), spacing=(0.8, 0.8, 1.6),
                  crop=(0, h, 0, w, 0, d), source=f"tiny{seed}")


def make_tiny_dataset(root: Path, with_salience: bool = True) -> TinyDataset:
    root_path, list_dir, name = root / "data", root / "list", "tiny"
    paths = DatasetPaths.of(root_path, name, list_dir)
    cases = [f"case{i:04d}" for i in range(1, 6)]
    splits = {"train": cases[:3], "val": cases[3:4], "test": cases[4:]}
    slices = []
    for i, case in enumerate(cases):
        vol = tiny_volume(i)
        write_volume(paths.volume(case), vol)
        sal = None
        if with_salience:
            # stand-in salience: the image itself, three times, min-max normalised
            sal = np.stack([vol.image] * 3)
            sal = (sal - sal.min()) / (sal.max() - sal.min())
            write_salience(paths.salience(case), sal, generator="test-standin")
        if case in splits["train"]:
            for z in range(vol.image.shape[2]):
                nm = slice_name(case, z)
                write_slice(paths.slice(nm), vol.image[:, :, z], vol.label[:, :, z],
                            None if sal is None else sal[:, :, :, z])
                slices.append(nm)
    for split, names in splits.items():
        write_list(paths.list_file(f"vol_{split}"), names)
    write_list(paths.list_file("slice_train"), slices)
    return TinyDataset(root_path, list_dir, name, paths, splits)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> TinyDataset:
    return make_tiny_dataset(tmp_path)


@pytest.fixture
def tiny_dataset_no_salience(tmp_path: Path) -> TinyDataset:
    return make_tiny_dataset(tmp_path, with_salience=False)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: with tiny tensors on a shared machine, thread start-up
    and contention dominate."""
    with threads.one_thread():
        yield


@pytest.fixture(scope="module")
def tree_data(tmp_path_factory) -> Path:
    """Three tiny phantom patients preprocessed with a class map (1 portal vein, 2 hepatic veins)
    under ``<root>/data`` and ``<root>/list`` (one case per split); their DICOM under ``<root>/raw``."""
    from phantom.generator import make_phantoms
    from preprocessing.pipeline import preprocess

    root = tmp_path_factory.mktemp("trees")
    make_phantoms(root / "raw", 3, "tiny", 5)
    assert preprocess("phantom", root / "raw", root / "data", root / "list",
                      vessel_classes=("portalvein", "venoussystem"), split=(0.34, 0.33, 0.33)).ok
    return root
