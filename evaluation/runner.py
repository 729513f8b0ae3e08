"""The work behind test.py: predict, score and report every case of a split (docs/DESIGN.md section 4).

See test.py for the command line; :func:`run_evaluation` is the typed entry point tests call.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dataloaders.datasets import read_case_salience
from evaluation.graph import GRAPH_KEYS
from evaluation.metrics import METRIC_KEYS, evaluate_case, wrong_tree_share
from evaluation.predictions import PRED_FORMATS, save_prediction
from evaluation.reports import (
    WRONG_TREE,
    markdown_table,
    read_per_case_csv,
    summarize,
    tree_columns,
    write_per_case_csv,
    write_summary_json,
)
from inference.predictor import Predictor, spacing_warning
from inference.trees import TREE_SMOOTHNESS, check_smoothness, consistent_trees
from utils import provenance
from utils.atomic import atomic_dir
from utils.h5io import DatasetPaths, read_list, read_volume, salience_made_by
from utils.manifests import volume_class_labels

if TYPE_CHECKING:
    from inference.tree_model import TreeModel

log = logging.getLogger("test")  # messages read as coming from test.py

ROI_CHOICES = ("none", "liver")
REPORT_FILES = ("per_case.csv", "summary.json", "results.md")
EXTRA_KEYS = ("seconds_inference", "seconds_metrics")


@dataclass
class EvalResult:
    """A test.py report: its folder, per-case rows, summary (metric -> statistics); ``skipped`` when
    an existing report of the same model and options was returned."""
    output: Path
    rows: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    skipped: bool = False
    #: the trees of a two-tree or tree-model report (their per-tree columns in rows and summary); None for a binary one
    classes: Optional[list[str]] = None


def backbone_dirnames(backbone: str) -> list[str]:
    """Folder names a backbone's runs may live in (``monai:X`` cannot be a folder name everywhere)."""
    return list(dict.fromkeys([backbone, backbone.replace(":", "_"), backbone.replace(":", "-")]))


def _run_description(model_path: Path) -> dict:
    """{"exp", "salience"} of the run that wrote ``model_path``: its config.json, else the checkpoint."""
    config = model_path.parent / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
            return {"exp": cfg.get("exp"), "salience": cfg.get("salience")}
        except (OSError, json.JSONDecodeError):
            pass
    from networks.checkpoint import load_checkpoint

    ckpt = load_checkpoint(model_path)
    return {"exp": ckpt.get("config", {}).get("exp"), "salience": ckpt["salience"]}


def find_checkpoint(checkpoint_root: Path, dataset: str, backbone: str, exp: Optional[str] = None,
                    salience: Optional[str] = None) -> Path:
    """The one ``best_model.pth`` under ``checkpoint_root/<dataset>/<backbone>/`` (any depth) whose run
    matches ``exp`` (run folder name) and ``salience`` when given.

    FileNotFoundError when none matches; ValueError listing the candidates when several do.
    """
    found: list[Path] = []
    tried = []
    for name in backbone_dirnames(backbone):
        base = checkpoint_root / dataset / name
        tried.append(str(base))
        if base.is_dir():
            found.extend(base.rglob("best_model.pth"))
    found = sorted(set(found))
    wanted = " ".join(f"--{k} {v}" for k, v in (("exp", exp), ("salience", salience)) if v is not None)
    if exp is not None:
        found = [p for p in found if p.parent.name == exp or _run_description(p)["exp"] == exp]
    if salience is not None:
        found = [p for p in found if _run_description(p)["salience"] == salience]
    if not found:
        raise FileNotFoundError(f"{' or '.join(tried)}: no best_model.pth found{' for ' + wanted if wanted else ''} "
                                f"(train with main.py or pass --model_path)")
    if len(found) > 1:
        # the folder the runs are in ("monai:X" is stored as monai_X)
        where = next(t for t in tried if Path(t).is_dir())
        raise ValueError(f"{where}: {len(found)} runs match{' ' + wanted if wanted else ''}; choose one with "
                         f"--exp / --salience or --model_path: {', '.join(str(p) for p in found)}")
    return found[0]


def salience_warning(case: str, salience_path: Path, ckpt: dict) -> Optional[str]:
    """A warning when an offline model meets salience maps made otherwise than the maps it was
    trained on: another generator, other weights or another normalisation rule (the checkpoint's
    embedded generator record, or for files before it ``head_sha256``, against the map file's
    attributes). Its input channels then differ from what it learnt, and so do its scores. None
    when they agree or are unrecorded on either side."""
    if ckpt.get("salience") != "offline":
        return None
    gen = ckpt.get("generator") or {}
    trained = (str(gen.get("kind") or ""), str(gen.get("weights_sha256") or ckpt.get("head_sha256") or ""),
               str(gen.get("normalisation") or "volume") if gen else "")
    made = salience_made_by(salience_path)
    short = (str, lambda sha: sha[:12] + "...", str)  # how each field is shown
    differ = [f"{what} {show(m)} vs {show(t)}"
              for what, show, m, t in zip(("generator", "weights sha256", "normalisation"), short, made, trained)
              if t and m and m != t]
    if not differ:
        return None
    return (f"{case}: salience made otherwise than the maps the model was trained on ({'; '.join(differ)}, "
            f"{salience_path}); run salience_generation.py with the model's generator, weights and "
            f"--normalisation and --overwrite for scores of this model")


def default_output(model_path: Path, split: str, eval_roi: str, tta: bool) -> Path:
    """``<run folder>/eval_<split>[_roi-liver][_tta]``."""
    name = f"eval_{split}" + (f"_roi-{eval_roi}" if eval_roi != "none" else "") + ("_tta" if tta else "")
    return model_path.parent / name


@torch.no_grad()
def e2e_salience_2d(model: torch.nn.Module, image: np.ndarray, device: str, batch_size: int) -> Optional[np.ndarray]:
    """(1, H, W, D) transverse salience of a 2-D e2e model (its ``.salience`` module), for figures."""
    module = getattr(model, "salience", None)
    if not isinstance(module, torch.nn.Module):
        return None
    out = np.empty((1,) + image.shape, dtype=np.float32)
    for z0 in range(0, image.shape[2], batch_size):
        x = torch.from_numpy(np.moveaxis(image[:, :, z0:z0 + batch_size], 2, 0)[:, None].copy()).to(device)
        out[0, :, :, z0:z0 + batch_size] = np.moveaxis(module(x)[:, 0].float().cpu().numpy(), 0, 2)
    return out


def _preflight(paths: DatasetPaths, cases: Sequence[str], ckpt: dict) -> None:
    """Fail before any work if a volume or (for offline salience) a salience file is missing; warn
    when the salience was made by other weights than the model's maps (:func:`salience_warning`)."""
    for case in cases:
        if not paths.volume(case).is_file():
            raise FileNotFoundError(f"{paths.volume(case)}: volume file not found (listed in the split)")
        if ckpt["salience"] == "offline":
            if not paths.salience(case).is_file():
                raise FileNotFoundError(
                    f"{paths.salience(case)}: not found, but the checkpoint takes 3 channels (salience 'offline'); "
                    f"run salience_generation.py for this dataset")
            warning = salience_warning(case, paths.salience(case), ckpt)
            if warning:
                log.warning("%s", warning)


@dataclass
class _Evaluation:
    """What every case of one evaluation shares (built by :func:`_load_model`)."""

    paths: DatasetPaths
    predictor: Predictor
    overlap: float
    tta: bool
    batch_size: int
    eval_roi: str
    #: the class-map values of the model's classes, in its output order (None: a binary model)
    class_values: Optional[list[int]] = None
    #: a tree model (inference.tree_model) that labels a binary model's mask with its trees
    trees: Optional["TreeModel"] = None
    #: the tree model's minimum cut (inference.trees.cut_trees; 0: voxel by voxel)
    tree_smoothness: float = TREE_SMOOTHNESS

    @property
    def classes(self) -> list[str]:
        """The trees scored: the model's classes, or the tree model's; [] for one binary mask."""
        return list(self.predictor.classes or (self.trees.classes if self.trees is not None else []))

    @property
    def ckpt(self) -> dict:
        return self.predictor.ckpt or {}


def _check_options(eval_roi: str, save_pred: Optional[str], pred_kind: str, img_size: Optional[Sequence[int]]) -> None:
    if eval_roi not in ROI_CHOICES:
        raise ValueError(f"--eval_roi must be one of {ROI_CHOICES}, got {eval_roi!r}")
    if save_pred is not None and save_pred not in PRED_FORMATS:
        raise ValueError(f"--save_pred must be one of {PRED_FORMATS}, got {save_pred!r}")
    if pred_kind not in ("prob", "mask"):
        raise ValueError(f"--pred_kind must be prob or mask, got {pred_kind!r}")
    if img_size is not None and (len(img_size) != 2 or min(img_size) < 1):
        raise ValueError(f"--img_size needs two positive integers H W, got {img_size}")


def data_fingerprint(paths: DatasetPaths, cases: Sequence[str]) -> str:
    """sha256 over (name, size, mtime) of the volume and salience files of ``cases`` (-1 for one that
    is missing): a report of data written again since (preprocess.py, salience_generation.py) is
    not reused."""
    h = hashlib.sha256()
    files = [paths.volume(c) for c in cases] + [paths.salience(c) for c in cases]
    for f in files:
        st = f.stat() if f.is_file() else None
        h.update(f"{f.name}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1};".encode())
    return h.hexdigest()


def _existing_report(out_dir: Path, overwrite: bool, wanted: dict, extras: dict) -> Optional[EvalResult]:
    """The complete report in ``out_dir`` when it was made by what ``wanted`` (a provenance record)
    describes and holds the ``extras`` asked for (saved predictions of that format and kind,
    figures); None when there is none, ``overwrite`` is set, or it was made by something else
    (then it is computed again, and the log says which field differed). An incomplete folder is
    an error unless ``overwrite``."""
    if not out_dir.exists() or overwrite:
        return None
    if not all((out_dir / f).is_file() for f in REPORT_FILES):
        raise FileExistsError(f"{out_dir}: exists but holds no complete report (pass --overwrite to replace it)")
    doc = json.loads((out_dir / "summary.json").read_text())
    meta = doc.get("meta") or {}
    differ = provenance.mismatches(meta.get("provenance"), wanted)
    have = meta.get("outputs") or {}
    if extras["save_pred"] and (have.get("save_pred"), have.get("pred_kind")) != (extras["save_pred"],
                                                                                 extras["pred_kind"]):
        differ.append(f"saved predictions: {have.get('save_pred')}/{have.get('pred_kind')} there, "
                      f"{extras['save_pred']}/{extras['pred_kind']} asked for")
    if extras["figures"] and not have.get("figures"):
        differ.append("figures asked for, none there")
    if extras.get("graph") and not have.get("graph"):
        differ.append("graph scores asked for, none there")
    if differ:
        log.warning("%s: the report there was made by something else (%s); computing it again", out_dir,
                    "; ".join(differ[:4]))
        return None
    log.info("%s: complete report of this model and these options exists, kept (pass --overwrite to redo it)",
             out_dir)
    rows = read_per_case_csv(out_dir / "per_case.csv")
    summary = {k: {kk: (float("nan") if vv is None else vv) for kk, vv in v.items()} for k, v in doc["metrics"].items()}
    return EvalResult(out_dir, rows, summary, skipped=True, classes=meta.get("classes"))


def _load_model(model_path: Path, backbone: Optional[str], salience: Optional[str], paths: DatasetPaths,
                cases: Sequence[str],
                img_size: Optional[Sequence[int]], device: str, overlap: float, tta: bool, batch_size: int,
                eval_roi: str, min_component_mm3: Optional[float], model_sha256: str,
                tree_model: Optional[Path] = None, tree_smoothness: float = TREE_SMOOTHNESS) -> _Evaluation:
    """The model file as a :class:`Predictor` (its offline maps are the stored ones), checked
    against the options and the data; ``tree_model``: a tree model file for a binary model, its
    labels cut with ``tree_smoothness``."""
    from networks.checkpoint import check_compatible  # the metrics and reports work without torch models

    pred = Predictor.from_checkpoint(model_path, device, min_component_mm3=min_component_mm3, img_size=img_size,
                                     with_generator=False, sha256=model_sha256)
    ckpt = pred.ckpt or {}
    check_compatible(ckpt, model_path, backbone=backbone, salience=salience)
    if img_size is not None and pred.spatial_dims == 3:
        log.warning("--img_size is ignored for a 3-D model (it runs on patches of %s)", ckpt.get("patch_size"))
    elif img_size is not None and ckpt.get("img_size") and list(img_size) != list(ckpt["img_size"]):
        log.warning("running at --img_size %s although the model was trained at %s", list(img_size), ckpt["img_size"])
    _preflight(paths, cases, ckpt)
    values, trees = None, None
    if pred.classes or tree_model is not None:
        from utils.manifests import class_values, dataset_manifest_path, read_stage

        if tree_model is not None:
            from inference.tree_model import check_binary, load_tree_model, vessel_model_warning

            check_binary(tree_model, model_path, pred.classes)
            trees = load_tree_model(tree_model, pred.device)
            warning = vessel_model_warning(trees, model_sha256, ckpt)
            if warning:
                log.warning("%s", warning)
            seen = trees.trained_on(paths.root.parent, paths.root.name, cases)
            if seen:
                # scored on cases it learnt from, the tree model looks better than it is
                log.warning("%s was trained on %d of these test cases (%s): their trees are not a held-out score",
                            tree_model, len(seen), ", ".join(seen[:5]) + (", ..." if len(seen) > 5 else ""))
        # the class map of the test data, whose volumes hold the truth: the model's classes are
        # names, which may be stored under other values than in the data it learnt from
        doc = read_stage(paths, with_salience=False)["dataset"]
        where = dataset_manifest_path(paths)
        if doc is None and pred.classes and (ckpt.get("manifests") or {}).get("dataset"):
            # test data from before manifests: the class map the model learnt from is the best guess
            log.warning("%s: missing; the trees are read with the class map of the data the model learnt from",
                        where)
            doc = ckpt["manifests"]["dataset"]
        values = class_values(pred.classes or trees.classes, doc, where)
    return _Evaluation(paths, pred, overlap, tta, batch_size, eval_roi, values, trees, tree_smoothness)


def tree_keys(classes: Sequence[str]) -> list[str]:
    """Report columns of a model of classes beyond the union's: every metric per class
    (``<class>_<metric>``) and the shares of found vessel voxels given the other tree as
    predict.py writes them (after the one-tree-per-piece step for a model of classes, after the
    minimum cut for a tree model) and voxel by voxel before that."""
    return [f"{c}_{k}" for c in classes for k in METRIC_KEYS] + ["wrong_tree_share", "wrong_tree_share_voxelwise"]


def _evaluate_one(ev: _Evaluation, case: str, tmp: Path, save_pred: Optional[str], pred_kind: str,
                  figures: bool, graph: bool = False) -> dict[str, Any]:
    """Predict and score one case; write its prediction and figures into ``tmp`` when asked."""
    paths, pr = ev.paths, ev.predictor
    mode, dims = pr.salience_mode, pr.spatial_dims
    vol = read_volume(paths.volume(case))
    sal = read_case_salience(paths, case, vol.image.shape) if mode == "offline" else None
    warning = spacing_warning(case, vol.spacing, vol.image.shape, ev.ckpt, pr.img_size)
    if warning:
        log.warning("%s", warning)
    roi = None
    if ev.eval_roi == "liver":
        if vol.liver is None:
            raise ValueError(f"{paths.volume(case)}: no 'liver' mask, needed by --eval_roi liver (data without "
                             "liver masks, as MSD Task08: score the whole volume with --eval_roi none)")
        roi = vol.liver.astype(bool)
    t0 = time.perf_counter()
    prob = pr.probabilities(vol.image, vol.spacing, sal, tta=ev.tta, overlap=ev.overlap, batch_size=ev.batch_size)
    t1 = time.perf_counter()
    # post-processed inside the ROI, as predict.py --liver_mask does: a component's size is
    # what lies in the scored region
    truth = vol.label
    if ev.class_values is None:
        pred = pr.mask(prob, vol.spacing, roi)
        tree_row: dict[str, Any] = {}
    else:
        true_labels = volume_class_labels(vol.classes, ev.class_values, paths.volume(case),
                                          f", needed to score the trees {ev.classes}")
        if ev.trees is None:
            voxelwise = pr.labels(prob, vol.spacing, roi, consistent=False)
            labels = consistent_trees(voxelwise)
        else:
            # a tree model decides in 3-D already; the one-tree-per-piece step, made for slice-by-slice
            # decisions, would hand its largest part of a piece where both trees touch to one tree.
            # As written: its minimum cut
            voxelwise, labels = ev.trees.classify_both(vol.image, pr.mask(prob, vol.spacing, roi), vol.spacing,
                                                       ev.tree_smoothness)
        pred, truth = labels > 0, true_labels > 0
        tree_row = {f"{c}_{key}": value for k, c in enumerate(ev.classes)
                    for key, value in evaluate_case(labels == k + 1, true_labels == k + 1, vol.spacing, roi).items()}
        tree_row["wrong_tree_share"] = wrong_tree_share(labels, true_labels, roi)
        tree_row["wrong_tree_share_voxelwise"] = wrong_tree_share(voxelwise, true_labels, roi)
    row: dict[str, Any] = {"case": case, **evaluate_case(pred, truth, vol.spacing, roi), **tree_row}
    if row["empty_pred"] and not row["empty_true"]:
        # a collapsed model reads as Dice 0 in a pooled table; name it where it happens
        union = prob if prob.ndim == 3 else prob.max(axis=0)  # (K, H, W, D): the largest class
        scored = union if roi is None else union[roi]
        log.warning("%s: the model predicts no vessel (highest probability %.3f, threshold %.2f; the label "
                    "holds %d voxels)", case, float(scored.max()) if scored.size else float("nan"),
                    pr.threshold, row["voxels_true"])
    if graph:
        row.update(_graph_scores(tmp, case, pred, truth.astype(bool), vol.spacing, roi))
    row["seconds_inference"] = t1 - t0
    row["seconds_metrics"] = time.perf_counter() - t1
    if save_pred is not None:
        (tmp / "predictions").mkdir(exist_ok=True)
        # a model of classes: the largest class probability, and the label map as the mask (0, 1, 2, ...)
        saved = prob if prob.ndim == 3 else prob.max(axis=0)
        save_prediction(tmp / "predictions", case, saved, vol.spacing, save_pred, as_mask=pred_kind == "mask",
                        mask=pred if ev.class_values is None else labels,
                        image=vol.image, crop=vol.crop, origin=vol.attrs.get("origin_mm"),
                        direction=vol.attrs.get("direction"))
    if figures:
        from evaluation.figures import mip_figure, overlay_figure  # matplotlib: only when drawing

        (tmp / "figures").mkdir(exist_ok=True)
        shown_sal = sal
        if mode == "e2e" and dims == 2:
            shown_sal = e2e_salience_2d(pr.model, vol.image, pr.device, ev.batch_size)
        title = f"{case}: Dice {row['dice']:.3f}, clDice {row['cldice']:.3f}"
        shown = roi if roi is not None else np.ones_like(pred)
        overlay_figure(tmp / "figures" / f"{case}_overlay.png", vol.image, pred & shown,
                       truth.astype(bool) & shown, vol.spacing, salience=shown_sal, title=title)
        mip_figure(tmp / "figures" / f"{case}_mip.png", pred & shown, truth.astype(bool) & shown,
                   vol.spacing, salience=shown_sal, title=title)
    return row


def _graph_scores(tmp: Path, case: str, pred: np.ndarray, label: np.ndarray, spacing: Sequence[float],
                  roi: Optional[np.ndarray]) -> dict[str, float]:
    """Branch graphs of the prediction and the truth (inside ``roi``), written to ``graphs/`` as
    GraphML, and the graph scores (``evaluation.graph.graph_scores``)."""
    from evaluation.graph import graph_scores, vessel_graph, write_graphml  # skan: only when asked

    if roi is not None:
        pred, label = pred & roi, label & roi
    gp, gt = vessel_graph(pred, spacing), vessel_graph(label, spacing)
    (tmp / "graphs").mkdir(exist_ok=True)
    write_graphml(gp, tmp / "graphs" / f"{case}_pred.graphml")
    write_graphml(gt, tmp / "graphs" / f"{case}_true.graphml")
    return graph_scores(pred, label, spacing, gp, gt)


def _write_reports(tmp: Path, ev: _Evaluation, rows: list[dict[str, Any]], keys: list[str], *, dataset: str,
                   split: str, cases: Sequence[str], model_path: Path, record: dict,
                   extras: dict) -> dict[str, dict[str, float]]:
    """per_case.csv, summary.json and results.md into ``tmp``; returns the summary.

    ``record``: the :func:`utils.provenance.record` of this evaluation, stored as
    ``meta.provenance`` (and its model hash and code version in the CSV's first lines)."""
    ckpt, pr = ev.ckpt, ev.predictor
    mode = pr.salience_mode
    summary = summarize(rows, keys)
    meta = {
        "dataset": dataset, "split": split, "cases": list(cases), "n_cases": len(cases),
        "model_path": str(model_path), "model_sha256": record["model_sha256"],
        "model_name": ckpt["model_name"], "model_kwargs": ckpt["model_kwargs"], "salience": mode,
        "spatial_dims": pr.spatial_dims, "epoch": ckpt.get("epoch"), "best_metric": ckpt.get("best_metric"),
        "img_size": pr.img_size if pr.spatial_dims == 2 else None, "patch_size": ckpt.get("patch_size"),
        "target_spacing": ckpt.get("target_spacing") if pr.spatial_dims == 2 else None,
        "n_empty_pred": int(sum(r["empty_pred"] for r in rows)),
        "n_empty_true": int(sum(r["empty_true"] for r in rows)),
        "overlap": ev.overlap, "tta": ev.tta, "threshold": pr.threshold,
        "min_component_mm3": pr.min_component_mm3, "eval_roi": ev.eval_roi, "device": pr.device,
        "classes": list(ev.classes) if ev.classes else None,
        "tree_model": None if ev.trees is None else {"path": ev.trees.path, "sha256": ev.trees.sha256,
                                                     "smoothness": ev.tree_smoothness},
        "created": record["created"], "code_version": record["code_version"], "provenance": record,
        "outputs": extras,
        "conventions": "NaN (null in JSON) where a metric is undefined (empty mask / empty bin); "
                       "statistics ignore NaN and count them (n_nan); CI = t-interval over cases",
    }
    write_per_case_csv(tmp / "per_case.csv", rows, keys)
    write_summary_json(tmp / "summary.json", summary, meta)
    header = (f"**{ckpt['model_name']}** (salience {mode}) on {dataset} / {split}, {len(cases)} cases, "
              f"ROI {ev.eval_roi}, TTA {'on' if ev.tta else 'off'}, threshold {pr.threshold}, "
              f"components under {pr.min_component_mm3:g} mm^3 dropped; "
              f"checkpoint `{model_path}` (epoch {ckpt.get('epoch')}).\n"
              "Distances in mm; CLrec = centreline recall by vessel radius (mm); CC = connected components "
              "(26-connectivity); n/a = undefined (empty mask or bin).\n\n")
    trees = ""
    if ev.classes:
        step = "minimum cut" if ev.trees is not None else "one-tree-per-piece step"
        trees = (f"\n**Per tree** (wrong tree: {WRONG_TREE}; as written, and voxel by voxel before the {step}):\n\n"
                 + markdown_table(rows, summary, tree_columns(ev.classes)))
    (tmp / "results.md").write_text(header + markdown_table(rows, summary) + trees)
    return summary


def run_evaluation(
    *,
    dataset: str,
    backbone: Optional[str] = None,
    root_path: str | Path = "data",
    list_dir: str | Path = "list",
    model_path: Optional[str | Path] = None,
    checkpoint_root: str | Path = "checkpoint",
    exp: Optional[str] = None,
    salience: Optional[str] = None,
    split: str = "test",
    overlap: float = 0.5,
    tta: bool = False,
    img_size: Optional[Sequence[int]] = None,
    eval_roi: str = "none",
    save_pred: Optional[str] = None,
    pred_kind: str = "prob",
    figures: bool = False,
    device: str = "auto",
    batch_size: int = 8,
    output: Optional[str | Path] = None,
    overwrite: bool = False,
    min_component_mm3: Optional[float] = None,
    graph: bool = False,
    tree_model: Optional[str | Path] = None,
    tree_smoothness: float = TREE_SMOOTHNESS,
) -> EvalResult:
    """Predict and score every case of ``split``; write the report folder; return rows and summary.

    ``min_component_mm3``: post-processing (``inference.vessel_mask``); None: the checkpoint's.
    ``graph``: also the branch graphs of prediction and truth (``graphs/*.graphml``) and the graph
    scores (``evaluation.graph.GRAPH_KEYS``) per case. ``tree_model``: a tree model file
    (``train_tree_model.py``) that labels the binary model's mask with its trees, scored per tree
    as a model of classes is; its labels are the minimum cut of its logit with ``tree_smoothness``
    (:func:`inference.trees.cut_trees`), and ``wrong_tree_share_voxelwise`` scores its sign voxel
    by voxel.

    Raises FileNotFoundError / ValueError with a one-line message naming the file on bad input;
    nothing is written then. An existing complete report is returned unchanged when it was made by the
    same model file (sha256), options, input files and code version (``meta.provenance`` of its
    summary.json, :mod:`utils.provenance`); otherwise, or with ``overwrite``, it is computed again.
    """
    _check_options(eval_roi, save_pred, pred_kind, img_size)
    tree_smoothness = check_smoothness(tree_smoothness)
    paths = DatasetPaths.of(root_path, dataset, list_dir)
    cases = read_list(paths.list_file(f"vol_{split}"))
    if not cases:
        raise ValueError(f"{paths.list_file(f'vol_{split}')}: the list is empty")
    if model_path is None:
        if backbone is None:
            raise ValueError("give --backbone (to find checkpoint/<dataset>/<backbone>/) or --model_path")
        model_path = find_checkpoint(Path(checkpoint_root), dataset, backbone, exp=exp, salience=salience)
    for path, flag, what, name in ((model_path, "--model_path", "model", "best_model.pth"),
                                   (tree_model, "--tree_model", "tree model", "tree_model.pth")):
        if path is None:
            continue
        if not str(path).strip():  # Path("") would be the working folder
            raise FileNotFoundError(f"{flag} is empty")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: {what} file not found"
                                    + (f" (a folder: give the {name} in it)" if Path(path).is_dir() else ""))
    model_path = Path(model_path)
    out_dir = Path(output) if output is not None else default_output(model_path, split, eval_roi, tta)
    model_sha256 = provenance.file_sha256(model_path)
    wanted = provenance.record(model_sha256, {
        "dataset": dataset, "split": split, "cases": list(cases), "eval_roi": eval_roi, "tta": tta,
        "overlap": overlap, "img_size": None if img_size is None else list(img_size),
        "min_component_mm3": min_component_mm3, "data": data_fingerprint(paths, cases),
        "tree_model": None if tree_model is None else provenance.file_sha256(tree_model),
        "tree_smoothness": None if tree_model is None else tree_smoothness})
    extras = {"save_pred": save_pred, "pred_kind": pred_kind if save_pred else None, "figures": figures,
              "graph": graph}
    existing = _existing_report(out_dir, overwrite, wanted, extras)
    if existing is not None:
        return existing

    ev = _load_model(model_path, backbone, salience, paths, cases, img_size, device, overlap, tta, batch_size, eval_roi,
                     min_component_mm3, model_sha256, None if tree_model is None else Path(tree_model),
                     tree_smoothness)
    log.info("model %s (%d-D, salience %s, epoch %s) from %s; %d %s cases; roi %s; tta %s",
             ev.ckpt["model_name"], ev.predictor.spatial_dims, ev.predictor.salience_mode, ev.ckpt.get("epoch"), model_path, len(cases), split,
             eval_roi, tta)
    keys = (list(METRIC_KEYS) + (tree_keys(ev.classes) if ev.classes else [])
            + (list(GRAPH_KEYS) if graph else []) + list(EXTRA_KEYS))
    with atomic_dir(out_dir, overwrite=True) as tmp:
        rows = [_evaluate_one(ev, case, tmp, save_pred, pred_kind, figures, graph)
                for case in tqdm(cases, desc=f"evaluating {split}", unit="case")]
        summary = _write_reports(tmp, ev, rows, keys, dataset=dataset, split=split, cases=cases,
                                 model_path=model_path, record=wanted, extras=extras)
    log.info("report written to %s", out_dir)
    return EvalResult(out_dir, rows, summary, classes=list(ev.classes) if ev.classes else None)
