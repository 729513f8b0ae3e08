"""Raw patients (DICOM or NIfTI) -> the project's HDF5 layout (docs/DESIGN.md section 2).

For every case: ``vol_data/<case>.h5`` (image = clip(HU, 0, 400) / 400 float32 (H, W, D),
label uint8 {0, 1}, liver uint8 when known, attrs spacing / hu_window / crop / source), and for
training cases ``slice_data/<case>_slice<NNNN>.h5`` for every index NNNN along D of the stored
(cropped) volume. Lists under ``<list_dir>/<dataset>/``: the vol_* split lists (shipped for
3D-IRCADb, else a deterministic split) and the generated ``slice_train.txt``. The stage's
manifest ``<root>/<dataset>/dataset.json`` (utils.manifests) records the source, the options
and every case's shape, spacing and crop; a dataset made with other options is refused
unless ``overwrite``.

A patient whose input is bad fails with a one-line error and gets no output at all; the others
still run. Complete outputs are skipped unless ``overwrite``.
"""
from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from preprocessing.dicom_reader import (MASKS_FOLDER, PATIENT_SERIES, PatientData, read_dicom_patient,
                                       vessel_groups, visible)
from preprocessing.errors import PreprocessError
from preprocessing.nifti_reader import find_nifti_cases, read_nifti_case
from utils import manifests
from utils.h5io import (HU_WINDOW, SPLITS, DatasetPaths, Volume, apply_hu_window, read_list, slice_name, write_list,
                        write_slice, write_volume)

log = logging.getLogger(__name__)

DEFAULT_VESSELS = ("portalvein", "venoussystem")
CROP_MODES = ("none", "liver_z", "liver_box")
FORMATS = ("dicom", "nifti")
# The authors' first release split 3D-IRCADb this way (docs/DESIGN.md section 2); the repo ships it as lists.
SEED_SPLITS: dict[str, dict[str, list[int]]] = {
    "3D-IRCADb": {
        "train": [1, 2, 3, 5, 6, 11, 12, 14, 17, 20],
        "val": [7, 9, 10, 15, 19],
        "test": [4, 8, 13, 16, 18],
    }
}
_IRCADB_FOLDER = re.compile(r"^3Dircadb1\.(\d+)$", re.IGNORECASE)


def case_name(folder: str) -> str:
    """``3Dircadb1.<n>`` -> ``case%04d``; any other folder keeps its name."""
    m = _IRCADB_FOLDER.match(folder)
    return f"case{int(m.group(1)):04d}" if m else folder


def seed_split(dataset: str) -> Optional[dict[str, list[str]]]:
    s = SEED_SPLITS.get(dataset)
    return None if s is None else {k: [f"case{i:04d}" for i in v] for k, v in s.items()}


def make_split(cases: Sequence[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> dict[str, list[str]]:
    """Deterministic train/val/test split of ``cases`` (a seeded permutation of the sorted names).

    With three or more cases, val and test get at least one each.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, got {fractions}")
    f = np.asarray(fractions, dtype=float) / float(sum(fractions))
    names = sorted(set(cases))
    n = len(names)
    perm = [names[i] for i in np.random.default_rng(seed).permutation(n)]
    n_val, n_test = int(round(f[1] * n)), int(round(f[2] * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1 if f[1] > 0 else 0), max(n_test, 1 if f[2] > 0 else 0)
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    n_train = n - n_val - n_test
    return {
        "train": sorted(perm[:n_train]),
        "val": sorted(perm[n_train : n_train + n_val]),
        "test": sorted(perm[n_train + n_val :]),
    }


def parse_split(text: str) -> tuple[float, float, float]:
    """``"60/20/20"`` -> (0.6, 0.2, 0.2)."""
    try:
        parts = tuple(float(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--split must look like 60/20/20, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise ValueError(f"--split must be three non-negative numbers like 60/20/20, got {text!r}")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def resolve_splits(
    paths: DatasetPaths,
    dataset: str,
    cases: Sequence[str],
    fractions: Sequence[float],
    seed: int,
    overwrite: bool,
) -> dict[str, list[str]]:
    """The vol_{train,val,test} lists to use, written when absent (or replaced with ``overwrite``).

    Existing lists are used as they are (never replaced without ``overwrite``). A dataset with a
    seed split (3D-IRCADb) gets that split; any other a deterministic ``make_split``.
    """
    files = {s: paths.list_file(f"vol_{s}") for s in SPLITS}
    present = [s for s, p in files.items() if p.is_file()]
    if len(present) == len(SPLITS) and not overwrite:
        splits = {s: read_list(p) for s, p in files.items()}
        listed = set().union(*splits.values())
        unlisted = sorted(set(cases) - listed)
        if unlisted:
            log.warning(
                "%s: %d case(s) in no split list (written to vol_data only): %s",
                paths.list_dir, len(unlisted), ", ".join(unlisted[:10]),
            )
        log.info("%s: using the split lists there (--split and --split-seed make new lists only; --overwrite "
                 "rewrites them)", paths.list_dir)
        return splits
    if present and not overwrite:
        raise FileExistsError(
            f"{files[present[0]]}: exists but {', '.join(str(files[s]) for s in SPLITS if s not in present)} "
            "does not; complete the lists or pass --overwrite to rewrite all three"
        )
    splits = seed_split(dataset)
    if splits:
        log.info("%s: the authors' seed split of %s (--split and --split-seed do not apply)", paths.list_dir, dataset)
    else:
        splits = make_split(cases, fractions, seed)
    for s in SPLITS:
        write_list(files[s], splits[s])
    log.info(
        "%s: wrote split lists (%s)", paths.list_dir, ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
    )
    return splits


def crop_box(liver: Optional[np.ndarray], shape: tuple[int, int, int], mode: str, margin: int) -> tuple[int, ...]:
    """(r0, r1, c0, c1, s0, s1), stops exclusive, in the source grid.

    ``liver_z``: the slices where the liver is present, full plane; ``liver_box``: the liver's
    bounding box on all three axes; both widened by ``margin`` voxels and clipped to the grid.
    ``none`` (or no liver voxel) keeps everything.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {mode!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    full = [0, shape[0], 0, shape[1], 0, shape[2]]
    if mode == "none" or liver is None or not liver.any():
        return tuple(full)
    axes = (2,) if mode == "liver_z" else (0, 1, 2)
    box = list(full)
    for ax in axes:
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(liver.any(axis=other))
        box[2 * ax] = max(int(idx[0]) - margin, 0)
        box[2 * ax + 1] = min(int(idx[-1]) + 1 + margin, shape[ax])
    return tuple(box)


def to_volume(data: PatientData, crop: str, margin: int, warn_no_liver: bool = True) -> Volume:
    """Crop, window and package one patient. Image = clip(HU, 0, 400) / 400, float32 (H, W, D).

    Without a liver mask a liver crop falls back to the full volume (a warning with
    ``warn_no_liver``, else an info line: image-only runs and NIfTI sets have no liver mask).
    """
    shape = data.hu.shape
    if crop != "none" and (data.liver is None or not data.liver.any()):
        (log.warning if warn_no_liver else log.info)(
            "%s: no liver mask, crop %s not possible: keeping the full volume", Path(data.source).name, crop
        )
    box = crop_box(data.liver, shape, crop, margin)
    sl = (slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5]))
    image = apply_hu_window(data.hu[sl])
    label = data.label[sl] if data.label is not None else np.zeros(image.shape, dtype=np.uint8)
    liver = data.liver[sl] if data.liver is not None else None
    classes = data.classes[sl] if data.classes is not None else None
    attrs = dict(data.attrs)
    attrs["source_shape"] = np.asarray(shape, dtype=np.int64)
    return Volume(
        image=image.astype(np.float32, copy=False),
        label=label.astype(np.uint8, copy=False),
        spacing=data.spacing,
        liver=liver,
        crop=box,
        source=data.source,
        attrs=attrs,
        classes=classes,
    )


@dataclass(frozen=True)
class CaseJob:
    """One case to convert; plain data so it pickles into a worker process."""

    case: str
    fmt: str
    source: Path  # patient folder (DICOM) or image file (NIfTI)
    label: Optional[Path]  # NIfTI label file
    train: bool
    root: Path
    list_dir: Path
    vessels: tuple[str, ...]
    with_masks: bool
    crop: str
    margin: int
    label_values: Optional[tuple[int, ...]]
    overwrite: bool
    vessel_classes: tuple[str, ...] = ()

    @property
    def paths(self) -> DatasetPaths:
        return DatasetPaths(self.root, self.list_dir)

    def options(self) -> str:
        """:func:`case_options` of this case."""
        return case_options(self.fmt, self.vessels, self.with_masks, self.crop, self.margin, self.train,
                            self.label_values, self.vessel_classes)


def case_options(fmt: str, vessels: Sequence[str], with_masks: bool, crop: str, margin: int, train: bool,
                 label_values: Optional[Sequence[int]], vessel_classes: Sequence[str]) -> str:
    """What decides a case's output besides its source, as JSON: stored in its volume
    (``preprocess_options``) so that a later run without ``--overwrite`` reuses it only when it was
    made the same way (an earlier run may have stopped before dataset.json was written). The
    source's path is left out, as in dataset.json's options: moved raw data is the same data."""
    return json.dumps({"format": fmt, "vessels": list(vessels), "with_masks": with_masks, "crop": crop,
                       "margin": margin, "train": train,
                       "label_values": None if label_values is None else [int(v) for v in label_values],
                       "vessel_classes": list(vessel_classes)}, sort_keys=True)


@dataclass
class CaseResult:
    case: str
    status: str  # "written" | "skipped" | "failed"
    depth: int = 0  # D of the stored volume
    message: str = ""


@dataclass
class Summary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, one-line error)

    @property
    def ok(self) -> bool:
        return not self.failed


def _stored_depth(path: Path, options: Optional[str] = None) -> Optional[int]:
    """D of a complete volume file, None if missing or unreadable, or (with ``options``) made with
    other options (:meth:`CaseJob.options`; a volume from before they were stored passes)."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or "label" not in f or f["image"].ndim != 3:
                return None
            stored = f.attrs.get("preprocess_options")
            if options is not None and stored is not None and str(stored) != options:
                return None
            return int(f["image"].shape[2])
    except OSError:
        return None


def _case_slices(paths: DatasetPaths, case: str) -> list[Path]:
    return sorted(paths.slice_data.glob(f"{case}_slice[0-9][0-9][0-9][0-9].h5")) if paths.slice_data.is_dir() else []


def output_depth(paths: DatasetPaths, case: str, train: bool, options: Optional[str] = None) -> Optional[int]:
    """D of the case's output when it is complete (volume, plus every slice for training cases) and
    (with ``options``) made with those options, else None."""
    d = _stored_depth(paths.volume(case), options)
    if d is None:
        return None
    if train and not all(paths.slice(slice_name(case, z)).is_file() for z in range(d)):
        return None
    return d


def _read_case(job: CaseJob) -> PatientData:
    if job.fmt == "dicom":
        return read_dicom_patient(job.source, job.vessels, with_masks=job.with_masks, classes=job.vessel_classes)
    return read_nifti_case(job.case, job.source, job.label if job.with_masks else None, job.label_values)


def _write_case(job: CaseJob, vol: Volume) -> None:
    """Slices first, the volume last: the volume's presence marks a finished case (the case's earlier
    output is gone by now, :func:`process_case`)."""
    paths = job.paths
    d = vol.image.shape[2]
    written: list[Path] = []
    try:
        if job.train:
            for z in range(d):
                p = paths.slice(slice_name(job.case, z))
                write_slice(p, vol.image[:, :, z], vol.label[:, :, z],
                            classes=None if vol.classes is None else vol.classes[:, :, z])
                written.append(p)
        write_volume(paths.volume(job.case), vol)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise


def process_case(job: CaseJob) -> CaseResult:
    """Convert one case; bad input -> status "failed" with a one-line message, and no output."""
    paths = job.paths
    if not job.overwrite:
        d = output_depth(paths, job.case, job.train, job.options())
        if d is not None:
            return CaseResult(job.case, "skipped", d)
        if paths.volume(job.case).exists():
            log.info("%s: output incomplete or made with other options, converting again", job.case)
    try:
        # the old output goes first: a case that fails now must not leave one that a later run reuses
        paths.volume(job.case).unlink(missing_ok=True)
        for old in _case_slices(paths, job.case):
            old.unlink()
        data = _read_case(job)
        vol = to_volume(data, job.crop, job.margin, warn_no_liver=job.with_masks and job.fmt == "dicom")
        vol.attrs["preprocess_options"] = job.options()
        _write_case(job, vol)
    except PreprocessError as e:
        return CaseResult(job.case, "failed", message=str(e))
    except (OSError, ValueError, MemoryError) as e:
        # unexpected, but one patient must not stop the others; the message still names the source
        log.debug("%s failed", job.case, exc_info=True)
        return CaseResult(job.case, "failed", message=f"{job.source.name}: {job.source}: {' '.join(str(e).split())}")
    return CaseResult(job.case, "written", vol.image.shape[2])


def _natural_key(p: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name))


def find_dicom_patients(src: Path) -> list[Path]:
    """Patient folders under ``src`` (or ``src`` itself when it holds PATIENT_DICOM), natural order."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    if (src / PATIENT_SERIES).is_dir() or (src / f"{PATIENT_SERIES}.zip").is_file():
        return [src]
    patients = sorted(
        (p for p in src.iterdir() if p.is_dir() and visible(p.name) and p.name != MASKS_FOLDER),
        key=_natural_key,
    )
    if not patients:
        raise FileNotFoundError(f"{src}: no patient folders (expected 3Dircadb1.<n>/{PATIENT_SERIES})")
    return patients


def preprocess(
    dataset: str,
    src: Optional[str | Path] = None,
    root_path: str | Path = "data",
    list_dir: str | Path = "list",
    *,
    fmt: str = "dicom",
    images: Optional[str | Path] = None,
    labels: Optional[str | Path] = None,
    vessels: Sequence[str] = DEFAULT_VESSELS,
    with_masks: bool = True,
    crop: str = "liver_z",
    margin: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    split_seed: int = 0,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    label_values: Optional[Sequence[int]] = None,
    vessel_classes: Sequence[str] = (),
) -> Summary:
    """Convert a dataset to ``<root_path>/<dataset>/`` and its lists to ``<list_dir>/<dataset>/``.

    ``fmt="dicom"``: ``src`` holds 3D-IRCADb-style patient folders (3Dircadb1.<n> -> case%04d).
    ``fmt="nifti"``: ``images`` / ``labels`` folders of NIfTI files, case names from file names.
    ``vessel_classes`` (DICOM only, e.g. ``("portalvein", "venoussystem")``): also store a class map
    (0 background, 1.. the classes in that order; ``CLASS_OVERLAP_RULE``) beside the binary label.
    Returns the summary; failed patients leave no output.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    vessel_classes = tuple(c.strip() for c in vessel_classes if c.strip())
    if vessel_classes and (fmt != "dicom" or not with_masks):
        raise ValueError("--vessel_classes needs DICOM input with masks (3D-IRCADb's mask folders name the trees)")
    if vessel_classes:
        # a class outside the binary label would make the class map's union another set of vessels than
        # the label a binary model is scored on: two union Dice values for one model and one truth
        outside = [g[0] for g in vessel_groups(vessel_classes) if g not in vessel_groups(vessels)]
        if outside:
            raise ValueError(f"--vessel_classes {','.join(vessel_classes)}: {', '.join(outside)} not in --vessels "
                             f"{','.join(vessels)}; each class must be one of the label's vessels")
    sources: list[tuple[str, Path, Optional[Path]]]
    if fmt == "dicom":
        if src is None:
            raise ValueError("--src is required for --format dicom")
        sources = [(case_name(p.name), p, None) for p in find_dicom_patients(Path(src))]
    else:
        if images is None:
            raise ValueError("--images is required for --format nifti")
        if labels is None and with_masks:
            raise ValueError("--labels is required for --format nifti (or pass --no-masks)")
        sources = find_nifti_cases(Path(images), Path(labels) if labels is not None else None)
        if not sources:
            raise FileNotFoundError(f"{images}: no .nii / .nii.gz files")
    names = [c for c, _, _ in sources]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise ValueError(f"{src or images}: several inputs give the case name(s) {', '.join(dupes)}")

    paths = DatasetPaths.of(root_path, dataset, list_dir)
    source = str(Path(src).resolve()) if fmt == "dicom" else {
        "images": str(Path(images).resolve()), "labels": None if labels is None else str(Path(labels).resolve())}
    # a NIfTI label is named by its values, unless --vessels liver says it is the liver (a liver
    # model's data: predict.py tells a liver model from a vessel model by this name); a liver label
    # is every non-zero value unless --label-values says otherwise (tumours are liver)
    nifti_liver = fmt == "nifti" and [v.lower() for v in vessels] == ["liver"]
    if nifti_liver and label_values is None:
        label_values = ()
    classes = list(vessels) if fmt == "dicom" or nifti_liver else (
        [f"label value {v}" for v in label_values] if label_values is not None else ["label value: automatic"])
    new_manifest = manifests.dataset_manifest(dataset, source=source, input_format=fmt, vessel_classes=classes,
                                              hu_window=HU_WINDOW, crop=crop, margin=margin, with_masks=with_masks,
                                              cases={}, class_map=[g[0] for g in vessel_groups(vessel_classes)])
    old_manifest = manifests.read_manifest(manifests.dataset_manifest_path(paths), manifests.DATASET_FORMAT)
    if old_manifest is not None and not overwrite:
        differ = manifests.option_differences(old_manifest, new_manifest)
        if differ:
            # its complete cases would be kept beside new ones made otherwise
            raise ValueError(f"{manifests.dataset_manifest_path(paths)}: the dataset there was made with other options "
                             f"({'; '.join(differ)}); pass --overwrite to make it again, or choose another --dataset")
    splits = resolve_splits(paths, dataset, names, split, split_seed, overwrite)
    train = set(splits["train"])
    jobs = [
        CaseJob(
            case=c, fmt=fmt, source=s, label=lab, train=c in train, root=paths.root, list_dir=paths.list_dir,
            vessels=tuple(vessels), with_masks=with_masks, crop=crop, margin=margin,
            label_values=None if label_values is None else tuple(int(v) for v in label_values), overwrite=overwrite,
            vessel_classes=vessel_classes,
        )
        for c, s, lab in sources
    ]

    results: dict[str, CaseResult] = {}
    with logging_redirect_tqdm(), tqdm(total=len(jobs), desc=f"preprocess {dataset}", unit="patient") as bar:
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                results[job.case] = process_case(job)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                futures = {pool.submit(process_case, job): job.case for job in jobs}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()

    summary = Summary()
    for job in jobs:
        r = results[job.case]
        if r.status == "failed":
            log.error("%s", r.message)
            summary.failed.append((r.case, r.message))
        else:
            (summary.written if r.status == "written" else summary.skipped).append(r.case)

    # Cases listed but not part of this run (e.g. patients not in --src) count when complete on disk.
    depth: dict[str, Optional[int]] = {}
    for c in sorted(set().union(*splits.values())):
        r = results.get(c)
        depth[c] = None if (r is not None and r.status == "failed") else (
            r.depth if r is not None else output_depth(paths, c, c in train, case_options(
                fmt, vessels, with_masks, crop, margin, c in train, label_values, vessel_classes))
        )
    slices = [slice_name(c, z) for c in splits["train"] if depth.get(c) for z in range(depth[c] or 0)]
    slice_list = paths.list_file("slice_train")
    if not slice_list.is_file() or read_list(slice_list) != slices:
        write_list(slice_list, slices)
    new_manifest["cases"] = {c: manifests.case_record(paths.volume(c)) for c, d in depth.items() if d is not None}
    manifests.write_dataset_manifest(paths, new_manifest)
    missing = [c for c, d in depth.items() if d is None]
    if missing:
        log.warning("%d listed case(s) have no complete output: %s", len(missing), ", ".join(missing[:10]))
    log.info(
        "summary: %d written, %d skipped (complete; --overwrite to redo), %d failed; %d training slices",
        len(summary.written), len(summary.skipped), len(summary.failed), len(slices),
    )
    return summary
