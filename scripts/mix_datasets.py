"""A dataset folder that mixes one real patient's training slices with phantom slices.

    python scripts/mix_datasets.py --real_root data/s2r/3D-IRCADb --real_list_dir LISTS/train1/3D-IRCADb \
        --real_slices LISTS/all/3D-IRCADb/slice_train.txt --phantom_root data/phantom \
        --phantom_list_dir list/phantom --out data/s2r/mix1/3D-IRCADb --out_list_dir LISTS/mix1/3D-IRCADb

Used by ``scripts/sim_to_real.sh`` for the "phantom+real, mixed" fine-tune. Nothing is
copied: ``<out>/{slice_data,vol_data,vol_salience}`` hold symbolic links (absolute) to the
real patients' files under their own names and to the phantom training cases' files renamed
``ph<NNNN>`` (``case0003`` -> ``ph0003``), so the two sets cannot collide. Where both sets have a
``dataset.json``, the mixed folder gets one too (the real one's options, both sets' cases, and
the fingerprints of the two); sets labelled differently (e.g. liver and vessels) are refused.
Where both sets' maps were made by one generator, the maps' manifest is merged too, so a model
trained on the mix carries its generator. The training list
holds the real training patient's slices (those of ``--real_slices`` whose case is in
``<real_list_dir>/vol_train.txt``) and ``--phantom_ratio`` times as many phantom slices (default 1), evenly spaced through the
phantoms' ``slice_train.txt``; ``vol_{train,val,test}.txt`` are copied from
``--real_list_dir``, so validation and testing stay on real patients.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.h5io import DatasetPaths, parse_slice_name, read_list, write_list  # noqa: E402
from utils.manifests import (  # noqa: E402
    DATASET_FORMAT, SALIENCE_FORMAT, dataset_manifest_path, fingerprint, read_manifest, salience_manifest_path,
    write_dataset_manifest, write_salience_manifest,
)
from utils.logging_setup import setup_logging  # noqa: E402

log = logging.getLogger("mix_datasets")


def evenly_spaced(items: Sequence[str], n: int) -> list[str]:
    """``n`` of ``items`` spread evenly through them, in order (all of them if n >= len): item
    j is kept where floor(j n / len) steps up to floor((j + 1) n / len), the last of each run."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = len(items)
    if n >= total:
        return list(items)
    return [items[j] for j in range(total) if j * n // total != (j + 1) * n // total]


def phantom_name(name: str, prefix: str = "ph") -> str:
    """``case0003`` -> ``ph0003``, ``case0003_slice0010`` -> ``ph0003_slice0010``."""
    if not name.startswith("case"):
        raise ValueError(f"phantom case or slice name must start with 'case', got {name!r}")
    return prefix + name[len("case"):]


def link_file(src: Path, dst: Path) -> None:
    """An absolute symbolic link ``dst`` -> ``src``; an existing ``dst`` must already point there."""
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src.resolve():
            return
        raise FileExistsError(f"{dst}: exists and points elsewhere than {src}")
    dst.symlink_to(src.resolve())


def case_links(src: DatasetPaths, out: DatasetPaths, cases: Sequence[str]) -> list[tuple[Path, Path]]:
    """(source, destination) pairs that carry ``cases`` (volume, and salience where made) from
    ``src`` into ``out`` under the same names; each case once, in order."""
    links = []
    for case in dict.fromkeys(cases):
        links.append((src.volume(case), out.volume(case)))
        if src.salience(case).is_file():
            links.append((src.salience(case), out.salience(case)))
    return links


def link_dataset_files(links: Sequence[tuple[Path, Path]], out: DatasetPaths) -> None:
    """Link every (source, destination) pair into ``out``'s folders; every source is checked
    (FileNotFoundError naming it) before anything is written."""
    for src, _ in links:
        if not src.is_file():
            raise FileNotFoundError(f"{src}: file not found")
    for folder in (out.slice_data, out.vol_data, out.vol_salience):
        folder.mkdir(parents=True, exist_ok=True)
    for src, dst in links:
        link_file(src, dst)


#: dataset.json fields both sets must share: they say what the label and the image mean
SHARED_OPTIONS = {k: (lambda doc, k=k: doc.get(k)) for k in ("vessel_classes", "label_rule", "hu_window", "class_map")}
#: maps' manifest fields both sets must share: one generator made both
SHARED_GENERATOR = {"generator kind": lambda doc: doc["generator"]["kind"],
                    "generator weights": lambda doc: doc["generator"]["weights_sha256"],
                    "normalisation": lambda doc: doc.get("normalisation")}


def _merge_pair(out: DatasetPaths, rpath: Path, ppath: Path, fmt: str, shared: dict, what: str,
                real_cases: Sequence[str], phantom_cases: Sequence[str]) -> Optional[tuple[dict, dict, dict]]:
    """The real and phantom manifests at ``rpath`` / ``ppath`` and their cases merged (phantoms
    renamed); None (with a warning) when either is missing; ValueError naming both files where a
    ``shared`` field differs."""
    rdoc, pdoc = read_manifest(rpath, fmt), read_manifest(ppath, fmt)
    if rdoc is None or pdoc is None:
        log.warning("%s: no %s to merge (%s), the mixed set gets none", out.root, rpath.name,
                    rpath if rdoc is None else ppath)
        return None
    for path, doc in ((rpath, rdoc), (ppath, pdoc)):
        if doc.get("in_progress"):  # utils.manifests: a salience run stopped midway
            raise ValueError(f"{path}: salience_generation.py did not finish there; run it again before mixing")
    for name, get in shared.items():
        if get(rdoc) != get(pdoc):
            raise ValueError(f"{ppath}: {name} {get(pdoc)!r} differs from {rpath}'s {get(rdoc)!r}: these {what} "
                             f"cannot be mixed")
    cases = {c: rdoc["cases"][c] for c in real_cases if c in rdoc.get("cases", {})}
    cases.update({phantom_name(c): pdoc["cases"][c] for c in phantom_cases if c in pdoc.get("cases", {})})
    return rdoc, pdoc, cases


def mixed_manifest(out: DatasetPaths, real: DatasetPaths, phantom: DatasetPaths, real_cases: Sequence[str],
                   phantom_cases: Sequence[str], phantom_ratio: float) -> Optional[dict]:
    """The mixed folder's dataset.json: the real set's, with the cases of both (phantoms renamed)
    and the fingerprints of the two it was mixed from; None when either set has no manifest.
    ValueError naming both files when they disagree on what the label or the image is (a
    liver-labelled set mixed with a vessel-labelled one would train on contradicting targets)."""
    pair = _merge_pair(out, dataset_manifest_path(real), dataset_manifest_path(phantom), DATASET_FORMAT,
                       SHARED_OPTIONS, "sets", real_cases, phantom_cases)
    if pair is None:
        return None
    rdoc, pdoc, cases = pair
    return {**rdoc, "dataset": out.root.name, "source": {"real": rdoc.get("source"), "phantom": pdoc.get("source")},
            "mixed_from": {"real": fingerprint(rdoc), "phantom": fingerprint(pdoc), "phantom_ratio": phantom_ratio},
            "cases": cases}


def mixed_salience_manifest(out: DatasetPaths, real: DatasetPaths, phantom: DatasetPaths, dataset_doc: dict,
                            real_cases: Sequence[str], phantom_cases: Sequence[str]) -> Optional[dict]:
    """The mixed folder's maps' manifest, when both sets' maps were made by one generator (kind,
    weights sha256, normalisation): so a model trained on the mix embeds that generator and
    predict.py needs nothing else. None (with a warning) when a set has no manifest; ValueError
    naming both files when the generators differ (the model would learn from two kinds of map)."""
    pair = _merge_pair(out, salience_manifest_path(real), salience_manifest_path(phantom), SALIENCE_FORMAT,
                       SHARED_GENERATOR, "maps", real_cases, phantom_cases)
    if pair is None:
        return None
    rdoc, _, cases = pair
    return {**rdoc, "dataset_fingerprint": fingerprint(dataset_doc), "cases": cases}


def build_mix(out: DatasetPaths, real: DatasetPaths, real_slices: Sequence[str], phantom: DatasetPaths,
              phantom_ratio: float = 1.0) -> list[str]:
    """Write the mixed dataset folder ``out.root`` and its lists in ``out.list_dir``; returns the
    training slice names.

    ``real.list_dir`` holds vol_{train,val,test}.txt (every case named there is linked, the
    training patient's slices of ``real_slices`` are trained on); ``phantom.list_dir`` holds
    the phantoms' vol_train.txt and slice_train.txt. Raises FileNotFoundError for a missing
    source file and ValueError when the training patient has no slices. ``phantom_ratio``: phantom
    slices per real training slice (0: none; all the phantoms' slices at most).
    """
    if phantom_ratio < 0:
        raise ValueError(f"phantom_ratio must be >= 0, got {phantom_ratio}")
    splits = {s: read_list(real.list_file(s)) for s in ("vol_train", "vol_val", "vol_test")}
    train_cases = set(splits["vol_train"])
    train_real = [s for s in real_slices if parse_slice_name(s)[0] in train_cases]
    if not train_real:
        raise ValueError(f"{real.list_file('vol_train')}: no slices of {sorted(train_cases)} in the real slice list")
    picked = evenly_spaced(read_list(phantom.list_file("slice_train")), round(phantom_ratio * len(train_real)))
    links = case_links(real, out, [c for names in splits.values() for c in names])
    links += [(phantom.volume(c), out.volume(phantom_name(c))) for c in read_list(phantom.list_file("vol_train"))]
    links += [(real.slice(n), out.slice(n)) for n in train_real]
    links += [(phantom.slice(n), out.slice(phantom_name(n))) for n in picked]
    link_dataset_files(links, out)
    names = train_real + [phantom_name(n) for n in picked]
    doc = mixed_manifest(out, real, phantom, [c for names_ in splits.values() for c in names_],
                         read_list(phantom.list_file("vol_train")), phantom_ratio)
    if doc is not None:
        write_dataset_manifest(out, doc)
        sal = mixed_salience_manifest(out, real, phantom, doc, [c for names_ in splits.values() for c in names_],
                                      read_list(phantom.list_file("vol_train")))
        if sal is not None:
            write_salience_manifest(out, sal)
    write_list(out.list_file("slice_train"), names)
    for split in splits:
        shutil.copyfile(real.list_file(split), out.list_file(split))
    log.info("%s: %d real slices (%s) + %d phantom slices", out.root, len(train_real), ", ".join(sorted(train_cases)),
             len(picked))
    return names


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real_root", type=Path, required=True, help="real dataset folder (slice_data, vol_data, ...)")
    p.add_argument("--real_list_dir", type=Path, required=True, help="lists naming the train / val / test patients")
    p.add_argument("--real_slices", type=Path, required=True, help="slice list holding the training patient's slices")
    p.add_argument("--phantom_root", type=Path, required=True)
    p.add_argument("--phantom_list_dir", type=Path, required=True, help="holds vol_train.txt and slice_train.txt")
    p.add_argument("--phantom_ratio", type=float, default=1.0,
                   help="phantom slices per real training slice (default 1: as many; 0: none)")
    p.add_argument("--out", type=Path, required=True, help="mixed dataset folder to write")
    p.add_argument("--out_list_dir", type=Path, required=True)
    args = p.parse_args(argv)
    setup_logging()
    try:
        build_mix(DatasetPaths(args.out, args.out_list_dir), DatasetPaths(args.real_root, args.real_list_dir),
                  read_list(args.real_slices), DatasetPaths(args.phantom_root, args.phantom_list_dir),
                  args.phantom_ratio)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
