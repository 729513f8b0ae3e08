"""Stage manifests: what each stage made and how, so the next stage reads it instead of searching.

``preprocess.py`` writes ``<root>/<dataset>/dataset.json``::

    format          "livervessel-dataset-v1"
    dataset, source input folder(s), input_format ("dicom" | "nifti")
    vessel_classes  the mask folders whose union is the label (3D-IRCADb) or the label values (NIfTI)
    label_rule      how the label is made from them
    hu_window       [lo, hi] HU; image = clip(HU, lo, hi) / (hi - lo)
    crop            {"mode": "none" | "liver_z" | "liver_box", "margin": voxels}
    with_masks      whether labels and liver masks were read
    class_map       {"classes": [names, label 1, 2, ...], "background": 0, "overlap": rule} when a
                    class map is stored beside the binary label (``--vessel_classes``), else null
    cases           {case: {"shape": [H, W, D], "spacing": [mm x 3], "crop": [6 ints], "source": str}}
    code_version, created

``salience_generation.py`` writes ``<root>/<dataset>/vol_salience/manifest.json``::

    format          "livervessel-salience-maps-v1"
    generator       {"kind": "bank" | "fpn" | "analytic", "parameters": {...},
                     "weights_sha256": str, "weights_path": absolute path or null}
    normalisation   "volume" | "fixed" (networks.salience.NORMALISATIONS)
    dataset_fingerprint  :func:`fingerprint` of the dataset.json the maps were made from
    cases           {case: [3, H, W, D]}
    code_version, created

``main.py`` copies both into the run folder and the checkpoint, and refuses data whose
manifests disagree (:func:`check_agreement`: one line naming the field). No torch here.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import h5py
import numpy as np

from utils.atomic import atomic_path
from utils.h5io import DatasetPaths
from utils.provenance import code_version, read_json_doc

DATASET_MANIFEST = "dataset.json"
SALIENCE_MANIFEST = "manifest.json"
DATASET_FORMAT = "livervessel-dataset-v1"
SALIENCE_FORMAT = "livervessel-salience-maps-v1"
#: keys that say when and by which commit, not what: left out of fingerprints and comparisons
VOLATILE = ("created", "code_version")
#: the options of preprocess.py that change every case: data made with others is another dataset
DATASET_OPTIONS = ("input_format", "vessel_classes", "label_rule", "hu_window", "crop", "with_masks", "class_map")


def dataset_manifest_path(paths: DatasetPaths) -> Path:
    """``<root>/<dataset>/dataset.json``."""
    return paths.root / DATASET_MANIFEST


def salience_manifest_path(paths: DatasetPaths) -> Path:
    """``<root>/<dataset>/vol_salience/manifest.json``."""
    return paths.vol_salience / SALIENCE_MANIFEST


def fingerprint(manifest: dict) -> str:
    """sha256 of a manifest's content, without the keys that only say when it was written."""
    body = {k: v for k, v in manifest.items() if k not in VOLATILE}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _write(path: Path, doc: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")
    return path


def read_manifest(path: str | os.PathLike, fmt: str) -> Optional[dict]:
    """The manifest at ``path``; None when there is none (data from before manifests);
    ValueError naming the file when it is unreadable or of another format."""
    path = Path(path)
    return read_json_doc(path, fmt, "manifest") if path.is_file() else None


def read_stage(paths: DatasetPaths, with_salience: bool) -> dict[str, Optional[dict]]:
    """{"dataset": dataset.json, "salience": the maps' manifest (only ``with_salience``)}, None where
    a file is missing (data from before manifests)."""
    docs = {"dataset": read_manifest(dataset_manifest_path(paths), DATASET_FORMAT)}
    if with_salience:
        docs["salience"] = read_manifest(salience_manifest_path(paths), SALIENCE_FORMAT)
    return docs


def changes(then: dict, now: dict) -> dict[str, str]:
    """Which stage manifests differ between ``then`` (e.g. a checkpoint's) and ``now`` (the data's),
    by key of ``now``: "changed" (fingerprints differ), "missing then" or "missing now"; keys whose
    manifest is missing on both sides are equal."""
    out = {}
    for key, doc in now.items():
        old = then.get(key)
        if doc is None and old is None:
            continue
        if old is None or doc is None:
            out[key] = "missing then" if old is None else "missing now"
        elif fingerprint(old) != fingerprint(doc):
            out[key] = "changed"
    return out


def case_record(volume_file: Path) -> dict[str, Any]:
    """shape, spacing, crop and source of one stored volume, from its HDF5 attributes."""
    with h5py.File(volume_file, "r") as f:
        return {"shape": [int(s) for s in f["image"].shape],
                "spacing": [float(s) for s in f.attrs.get("spacing", ())],
                "crop": [int(c) for c in f.attrs.get("crop", ())],
                "source": str(f.attrs.get("source", ""))}


def dataset_manifest(dataset: str, *, source: Any, input_format: str, vessel_classes: Sequence[Any],
                     hu_window: Sequence[float], crop: str, margin: int, with_masks: bool,
                     cases: dict[str, dict], class_map: Sequence[str] = ()) -> dict[str, Any]:
    """The dataset.json document (see the module docstring). ``class_map``: the classes of the
    stored class map, in label order (1, 2, ...); empty when only the binary label is stored."""
    return {
        "format": DATASET_FORMAT, "dataset": dataset, "source": source, "input_format": input_format,
        "vessel_classes": list(vessel_classes),
        "label_rule": "union of the vessel classes, > 0 -> 1" if with_masks else "none (image only: all zeros)",
        "hu_window": [float(v) for v in hu_window], "crop": {"mode": crop, "margin": int(margin)},
        "with_masks": bool(with_masks),
        "class_map": {"classes": list(class_map), "background": 0,
                      "overlap": "a voxel two masks claim goes to the class listed first"} if class_map else None,
        "cases": cases,
        "code_version": code_version(), "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }


#: names ``main.py --classes`` accepts for the class map's mask folders (3D-IRCADb names)
CLASS_ALIASES = {"portal": ("portalvein",), "hepatic": ("venoussystem", "venacava"), "artery": ("artery",)}


def class_tree(name: str) -> str:
    """The tree a class name stands for: ``portal``, ``hepatic`` or ``artery`` for those names and
    their mask folders (``CLASS_ALIASES``, any case), else the name in lower case."""
    low = name.lower()
    return next((t for t, folders in CLASS_ALIASES.items() if low == t or low in folders), low)


def class_values(names: Sequence[str], dataset: Optional[dict], where: str | os.PathLike) -> list[int]:
    """The class-map values (1, 2, ...) of the classes ``names`` (``portal``, ``hepatic``, ``artery`` or
    a mask folder name) in the dataset manifest ``dataset``; ValueError naming ``where`` when the
    data has no class map or not that class."""
    cmap = (dataset or {}).get("class_map")
    if not cmap:
        raise ValueError(f"{where}: no class map in this dataset; make one with preprocess.py --vessel_classes "
                         f"portalvein,venoussystem (--overwrite)")
    stored = [str(c).lower() for c in cmap["classes"]]
    out = []
    for name in names:
        folders = CLASS_ALIASES.get(name.lower(), (name.lower(),))
        hit = [i for i, c in enumerate(stored, start=1) if c in folders]
        if not hit:
            raise ValueError(f"{where}: class {name!r} is not in the class map {stored}")
        out.append(hit[0])
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: classes {list(names)} name one class twice")
    return out


def dataset_class_values(names: Sequence[str], paths: DatasetPaths) -> list[int]:
    """:func:`class_values` of ``names`` in the dataset manifest of ``paths``; ValueError naming it
    when there is none."""
    where = dataset_manifest_path(paths)
    doc = read_manifest(where, "livervessel-dataset-v1")
    if doc is None:
        raise ValueError(f"{where}: no dataset manifest (run preprocess.py --vessel_classes portalvein,venoussystem)")
    return class_values(names, doc, where)


def class_labels(class_map: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Label map uint8 of a stored class map: ``k + 1`` where it holds ``values[k]`` (the classes in
    the order asked for, whatever the stored order), 0 elsewhere."""
    out = np.zeros(np.shape(class_map), np.uint8)
    for k, v in enumerate(values):
        out[class_map == v] = k + 1
    return out


def volume_class_labels(classes: Optional[np.ndarray], values: Sequence[int], where: str | os.PathLike,
                        why: str = "") -> np.ndarray:
    """:func:`class_labels` of a volume's stored class map ``classes``; ValueError naming the
    volume file ``where`` (and ``why`` it is needed) when it has none."""
    if classes is None:
        raise ValueError(f"{where}: no class map{why} (preprocess.py --vessel_classes)")
    return class_labels(classes, values)


def option_differences(old: dict, new: dict) -> list[str]:
    """The preprocessing options on which two dataset manifests differ, as "name: old vs new"."""
    return [f"{k}: {old.get(k)!r} there vs {new.get(k)!r} now" for k in DATASET_OPTIONS if old.get(k) != new.get(k)]


def write_dataset_manifest(paths: DatasetPaths, doc: dict) -> Path:
    """Write dataset.json atomically; returns its path."""
    return _write(dataset_manifest_path(paths), doc)


def salience_manifest(*, kind: str, parameters: Optional[dict], weights_sha256: str,
                      weights_path: Optional[str | os.PathLike], normalisation: str,
                      dataset: Optional[dict], cases: dict[str, Sequence[int]]) -> dict[str, Any]:
    """The vol_salience/manifest.json document (see the module docstring)."""
    return {
        "format": SALIENCE_FORMAT,
        "generator": {"kind": kind, "parameters": parameters, "weights_sha256": weights_sha256,
                      "weights_path": None if weights_path is None else str(Path(weights_path).resolve())},
        "normalisation": normalisation,
        "dataset_fingerprint": None if dataset is None else fingerprint(dataset),
        "cases": {c: [int(s) for s in shape] for c, shape in cases.items()},
        "code_version": code_version(), "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def write_salience_manifest(paths: DatasetPaths, doc: dict) -> Path:
    """Write the maps' manifest atomically; returns its path."""
    return _write(salience_manifest_path(paths), doc)


def check_agreement(paths: DatasetPaths, dataset: Optional[dict], salience: Optional[dict],
                    cases: Sequence[str], hu_window: Sequence[float]) -> None:
    """ValueError (one line, naming the file and the field) when the manifests disagree with each
    other, with the code's HU window or with the ``cases`` a run uses; silent when both agree.

    Missing manifests (data from before they existed) are not checked here.
    """
    dpath, spath = dataset_manifest_path(paths), salience_manifest_path(paths)
    if dataset is not None:
        if [float(v) for v in dataset.get("hu_window", ())] != [float(v) for v in hu_window]:
            raise ValueError(f"{dpath}: hu_window {dataset.get('hu_window')} differs from the code's "
                             f"{list(hu_window)}; run preprocess.py --overwrite")
        missing = [c for c in cases if c not in (dataset.get("cases") or {})]
        if missing:
            raise ValueError(f"{dpath}: cases {missing[:3]} of the lists are not in the dataset "
                             f"({len(missing)} in all); run preprocess.py for them")
    if salience is None:
        return
    if salience.get("in_progress"):
        raise ValueError(f"{spath}: salience_generation.py did not finish (some maps may be another generator's "
                         f"than the manifest names); run it again")
    if dataset is not None and salience.get("dataset_fingerprint") != fingerprint(dataset):
        raise ValueError(f"{spath}: dataset_fingerprint differs: the maps were made from another {DATASET_MANIFEST} "
                         f"(preprocess.py ran since); run salience_generation.py --overwrite")
    have = salience.get("cases") or {}
    for c in cases:
        if c not in have:
            raise ValueError(f"{spath}: cases: no map of {c}; run salience_generation.py")
        if dataset is not None:
            want = [3, *dataset["cases"][c]["shape"]]
            if list(have[c]) != want:
                raise ValueError(f"{spath}: cases: {c} has shape {have[c]} there, {DATASET_MANIFEST} says {want}")
