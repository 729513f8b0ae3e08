"""Where the portal vein and the hepatic veins touch in the truth (issue 26): why one label per
connected piece cannot tell the trees apart, on phantoms and on real CT alike.

    python bench/tree_contacts.py [--phantoms 10 --seed 300] [--real ../shared/real]
        [--tree_model FILE [--tree_smoothness 8]] [--record NAME]

Every patient is read with the project's DICOM reader and its class map (``portalvein``,
``venoussystem``; a voxel both masks claim is portal, ``CLASS_OVERLAP_RULE``), the whole
annotated masks (not only inside the liver). Per patient (:func:`tree_contacts`):

* the pieces (26-connected) of each tree and of their union, and how many union pieces hold both;
* the share of the union's voxels that the best one-label-per-piece rule puts in the wrong tree
  (each piece given its majority tree, with the truth's own labels): the floor of any step that
  makes each connected piece one tree, before any model errs;
* contact voxels (a voxel of one tree 26-adjacent to one of the other) and contact places
  (26-connected groups of them): where a method has to cut the union to separate the trees;
* with ``--tree_model FILE`` (``scripts/train_tree_model.sh``): the share of the union's voxels
  that the tree model puts in the wrong tree when it is given the *true* union, not a binary
  model's mask: its own error, before any mask errs (its image is the scan in the HU window of
  ``preprocess.py``); voxel by voxel and after the minimum cut that ``predict.py`` applies
  (``inference.trees.cut_trees``, ``--tree_smoothness``, by default predict.py's).

The phantoms are ``--phantoms`` demo-preset patients made with ``--seed`` (default: the 10
held-out phantoms of ``tree_scores_phantom10``, seed 300) in a temporary folder; the real
patients are those of :data:`bench.salience_quality.REAL_PATIENTS` under ``--real`` (skipped when
absent). Prints a Markdown table; ``--record NAME`` writes ``results/NAME.json`` (utils.records).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.salience_quality import REAL_PATIENTS, REAL_ROOT  # noqa: E402
from preprocessing.dicom_reader import read_dicom_patient  # noqa: E402
from inference.trees import TREE_SMOOTHNESS, check_smoothness  # noqa: E402
from utils.h5io import apply_hu_window  # noqa: E402
from utils.logging_setup import setup_logging  # noqa: E402
from utils.records import new_record_arg  # noqa: E402

CLASSES = ("portalvein", "venoussystem")
_CUBE = np.ones((3, 3, 3), dtype=bool)
log = logging.getLogger("bench")


def tree_contacts(classes: np.ndarray, labels: Optional[np.ndarray] = None,
                  cut_labels: Optional[np.ndarray] = None) -> dict[str, float]:
    """Connectivity of two trees in a class map (H, W, D) (0 background, 1 and 2 the trees).

    Returns: ``portal_voxels``, ``hepatic_voxels``; ``portal_pieces``, ``hepatic_pieces``,
    ``union_pieces`` and ``mixed_pieces`` (union pieces holding both trees), all 26-connected;
    ``piece_rule_wrong``: the share of the union's voxels in the wrong tree when each union
    piece is given its majority tree; ``contact_voxels``: voxels of either tree 26-adjacent to
    a voxel of the other; ``contact_places``: 26-connected groups of contact voxels. With
    ``labels`` (a method's label map of the true union, same shape): ``tree_model_wrong``, the
    share of the union's voxels it labels otherwise than the truth; likewise ``cut_labels``:
    ``tree_model_cut_wrong``.
    """
    classes = np.asarray(classes)
    if classes.ndim != 3:
        raise ValueError(f"a class map must be (H, W, D), got shape {classes.shape}")
    for lab in (labels, cut_labels):
        if lab is not None and np.shape(lab) != classes.shape:
            raise ValueError(f"labels {np.shape(lab)} and class map {classes.shape} differ in shape")
    if not set(np.unique(classes).tolist()) <= {0, 1, 2}:
        raise ValueError(f"a class map holds 0, 1 and 2 only, got values {np.unique(classes)[:8].tolist()}")
    portal, hepatic = classes == 1, classes == 2
    union = portal | hepatic
    _, n_portal = ndimage.label(portal, _CUBE)
    _, n_hepatic = ndimage.label(hepatic, _CUBE)
    pieces, n_union = ndimage.label(union, _CUBE)
    index = np.arange(1, n_union + 1)
    per_portal = np.asarray(ndimage.sum(portal, pieces, index))  # (n_union,), empty without vessels
    per_hepatic = np.asarray(ndimage.sum(hepatic, pieces, index))
    contact = (portal & ndimage.binary_dilation(hepatic, _CUBE)) | (hepatic & ndimage.binary_dilation(portal, _CUBE))
    _, n_places = ndimage.label(contact, _CUBE)
    n = int(union.sum())
    out = {"portal_voxels": int(portal.sum()), "hepatic_voxels": int(hepatic.sum()),
           "portal_pieces": int(n_portal), "hepatic_pieces": int(n_hepatic), "union_pieces": int(n_union),
           "mixed_pieces": int(np.count_nonzero((per_portal > 0) & (per_hepatic > 0))),
           "piece_rule_wrong": float(np.minimum(per_portal, per_hepatic).sum() / n) if n else float("nan"),
           "contact_voxels": int(contact.sum()), "contact_places": int(n_places)}
    for key, lab in (("tree_model_wrong", labels), ("tree_model_cut_wrong", cut_labels)):
        if lab is not None:
            out[key] = float(((np.asarray(lab) != classes) & union).sum() / n) if n else float("nan")
    return out


def patient_contacts(patient_dir: Path, tree_model: Any = None, smoothness: float = TREE_SMOOTHNESS) -> dict[str, float]:
    """:func:`tree_contacts` of a 3D-IRCADb-style patient folder (or one of its zips); with
    ``tree_model`` (:class:`inference.tree_model.TreeModel`) also its labels of the true union,
    voxel by voxel and cut with ``smoothness`` (:func:`inference.trees.cut_trees`)."""
    data = read_dicom_patient(patient_dir, CLASSES, classes=CLASSES)
    if data.classes is None:
        raise ValueError(f"{patient_dir}: no vessel masks to make a class map of")
    if tree_model is None:
        return tree_contacts(data.classes)
    voxelwise, cut = tree_model.classify_both(apply_hu_window(data.hu), data.classes > 0, data.spacing, smoothness)
    return tree_contacts(data.classes, voxelwise, cut)


COLUMNS = (("portal_pieces", "portal pieces", "d"), ("hepatic_pieces", "hepatic pieces", "d"),
           ("union_pieces", "union pieces", "d"), ("mixed_pieces", "pieces holding both", "d"),
           ("contact_places", "places where they touch", "d"), ("contact_voxels", "contact voxels", "d"),
           ("piece_rule_wrong", "wrong tree, one label per piece", "%"),
           ("tree_model_wrong", "wrong tree, the tree model on the true union", "%"),
           ("tree_model_cut_wrong", "the same, cut", "%"))


def table(rows: dict[str, dict]) -> list[str]:
    """Markdown lines: one row per patient, then the mean of the phantoms' rows when several; the
    tree model's column only when every row has it."""
    columns = [c for c in COLUMNS if all(c[0] in r for r in rows.values())]
    out = ["| patient | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]

    def cell(v: float, kind: str) -> str:
        return f"{v:.1%}" if kind == "%" else (f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}")

    phantoms = [r for n, r in rows.items() if n.startswith("phantom")]
    shown = dict(rows)
    if len(phantoms) > 1:
        shown[f"phantoms, mean of {len(phantoms)}"] = {k: float(np.mean([r[k] for r in phantoms])) for k, _, _ in columns}
    for name, r in shown.items():
        out.append(f"| {name} | " + " | ".join(cell(r[k], kind) for k, _, kind in columns) + " |")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phantoms", type=int, default=10, help="demo-preset phantoms to make (0: none)")
    p.add_argument("--seed", type=int, default=300, help="their seed (300: tree_scores_phantom10's held-out set)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--real", type=Path, default=REAL_ROOT, help="folder holding the real 3D-IRCADb patients")
    p.add_argument("--tree_model", type=Path, default=None, metavar="FILE",
                   help="also the share this tree model puts in the wrong tree given the true union")
    p.add_argument("--tree_smoothness", type=float, default=TREE_SMOOTHNESS, metavar="W",
                   help="with --tree_model: the minimum cut's weight of its second column (inference.trees.cut_trees)")
    p.add_argument("--record", type=new_record_arg, default=None, metavar="NAME",
                   help="also write results/NAME.json (utils.records)")
    a = p.parse_args(argv)
    try:
        a.tree_smoothness = check_smoothness(a.tree_smoothness)
    except ValueError as e:
        p.error(str(e))
    setup_logging(logging.WARNING)
    tree_model = None
    if a.tree_model is not None:
        from inference.tree_model import load_tree_model

        try:
            tree_model = load_tree_model(a.tree_model)
        except (OSError, ValueError) as e:
            p.error(str(e))
    rows: dict[str, dict] = {}
    if a.phantoms > 0:
        from phantom.generator import make_phantoms

        with tempfile.TemporaryDirectory(prefix="tree_contacts_") as tmp:
            for d in make_phantoms(Path(tmp), a.phantoms, "demo", a.seed, workers=a.workers):
                rows[f"phantom {d.name.split('.')[-1]}"] = patient_contacts(d, tree_model, a.tree_smoothness)
    real = []
    for name in REAL_PATIENTS:
        d = a.real / name
        if not d.is_dir():
            log.warning("%s absent: skipped", d)
            continue
        rows[f"real {name.split('.')[-1]}"] = patient_contacts(d, tree_model, a.tree_smoothness)
        real.append(name)
    if not rows:
        p.error("nothing to measure: --phantoms 0 and no real patient")
    lines = table(rows)
    print("\n".join(lines))
    if a.record:
        from utils.records import write_record

        path = write_record(a.record, {"patients": rows, "table_markdown": lines}, description=(
            f"where the true portal and hepatic trees touch (whole annotated masks, 26-connectivity): pieces, "
            f"contact places and the wrong-tree share of one label per connected piece"
            + ("" if tree_model is None else " and of the tree model given the true union (voxel by voxel and cut "
                                              f"with smoothness {a.tree_smoothness:g})")
            + f"; {a.phantoms} demo phantoms of seed {a.seed} and real 3D-IRCADb patients"),
            inputs={"phantoms": a.phantoms, "seed": a.seed, "preset": "demo", "real": real,
                    **({} if tree_model is None else {"tree_model": str(a.tree_model),
                                                       "tree_smoothness": a.tree_smoothness,
                                                       "tree_model_sha256": tree_model.sha256,
                                                       "tree_model_info": tree_model.info})})
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
