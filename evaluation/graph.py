"""A vessel mask as a branch graph: nodes (branch points, end points) and the branches between them.

:func:`vessel_graph` skeletonises the mask (``evaluation.metrics.skeleton``), lets ``skan``
split the skeleton into branches, and measures each branch in millimetres: its length along
the skeleton (``skan``'s branch distance with the voxel spacing), its mean and minimum radius
(the mask's Euclidean distance transform at the skeleton voxels, less half a voxel: the
transform reaches the centre of the first voxel outside, the wall lies halfway to it), its
tree (the majority label along it, when a label map is given) and its path in patient
coordinates. :func:`write_graphml` writes it for networkx (attributes named with their
units), :func:`write_vtk_polylines` as VTK polylines with the radius as point data (3D Slicer,
ParaView).

Arrays are (H, W, D) = (rows, columns, slices); spacing (row, col, slice) mm.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import ndimage

from evaluation.metrics import skeleton, skeleton_neighbours

#: skan's branch types, by name
BRANCH_KINDS = {0: "end-end", 1: "junction-end", 2: "junction-junction", 3: "loop"}


@dataclass
class Branch:
    """One branch: nodes ``src`` and ``dst`` (equal for a loop), length and radii in mm, the
    majority ``tree`` label along it (0 when unknown) and its path (N, 3) in patient mm."""

    id: int
    src: int
    dst: int
    kind: str
    length_mm: float
    mean_radius_mm: float
    min_radius_mm: float
    tree: int
    path_mm: np.ndarray
    radius_mm: np.ndarray  # (N,) along the path


@dataclass
class VesselGraph:
    """Nodes {id: {"position_mm": (3,), "kind": "branch point" | "end point" | "loop", "degree": int}}
    and branches."""

    nodes: dict[int, dict] = field(default_factory=dict)
    branches: list[Branch] = field(default_factory=list)

    @property
    def branch_points(self) -> list[int]:
        """Node ids of the skeleton's branch points (three or more neighbours)."""
        return [n for n, v in self.nodes.items() if v["kind"] == "branch point"]

    @property
    def end_points(self) -> list[int]:
        """Node ids of the skeleton's end points (a branch's free end: fewer than three neighbours)."""
        return [n for n, v in self.nodes.items() if v["kind"] == "end point"]


def vessel_graph(mask: np.ndarray, spacing: Sequence[float], labels: Optional[np.ndarray] = None,
                 to_patient: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> VesselGraph:
    """The branch graph of ``mask`` (bool (H, W, D)) with ``spacing`` mm.

    ``labels``: int (H, W, D) tree labels (e.g. 1 portal, 2 hepatic) for each branch's ``tree``;
    ``to_patient``: maps voxel indices (N, 3) to patient mm (e.g. ``Geometry.physical``); default
    index times spacing.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (H, W, D), got shape {mask.shape}")
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not np.all(sp > 0):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing}")
    if labels is not None and labels.shape != mask.shape:
        raise ValueError(f"labels {labels.shape} and mask {mask.shape} differ in shape")
    to_mm = to_patient if to_patient is not None else (lambda idx: np.asarray(idx, dtype=np.float64) * sp)
    skel = skeleton(mask)
    # a skeleton voxel with no skeleton neighbour (a speck's) is no branch; skan fails on a
    # skeleton made only of such voxels and ignores them otherwise
    skel &= skeleton_neighbours(skel) > 0
    graph = VesselGraph()
    if not skel.any():
        return graph
    from skan import Skeleton, summarize  # numba-compiled: imported only when a graph is asked for

    # the wall lies halfway between the last voxel inside and the first outside
    radius = ndimage.distance_transform_edt(mask, sampling=sp) - 0.5 * float(sp.min())
    sk = Skeleton(skel, spacing=sp)
    table = summarize(sk, separator="_")
    for i, row in enumerate(table.itertuples(index=False)):
        idx = np.asarray(sk.path_coordinates(i)).round().astype(int)
        r = radius[idx[:, 0], idx[:, 1], idx[:, 2]]
        tree = 0
        if labels is not None:
            values = labels[idx[:, 0], idx[:, 1], idx[:, 2]]
            values = values[values > 0]
            tree = int(np.bincount(values).argmax()) if values.size else 0
        src, dst = int(row.node_id_src), int(row.node_id_dst)
        kind = BRANCH_KINDS.get(int(row.branch_type), str(row.branch_type))
        graph.branches.append(Branch(i, src, dst, kind, float(row.branch_distance), float(r.mean()), float(r.min()),
                                     tree, to_mm(idx), r))
        for node, at in ((src, idx[0]), (dst, idx[-1])):
            degree = int(sk.degrees[node])
            node_kind = "loop" if kind == "loop" else "branch point" if degree >= 3 else "end point"
            graph.nodes.setdefault(node, {"position_mm": to_mm(at[None])[0], "kind": node_kind, "degree": degree})
    return graph


def in_patient_mm(graph: VesselGraph, spacing: Sequence[float],
                  to_patient: Callable[[np.ndarray], np.ndarray]) -> VesselGraph:
    """A copy of a graph made without ``to_patient`` (paths in index x spacing mm) with its paths and
    nodes mapped to patient mm by ``to_patient`` (voxel indices (N, 3) -> mm (N, 3))."""
    sp = np.asarray(spacing, dtype=np.float64)
    out = VesselGraph()
    for n, v in graph.nodes.items():
        out.nodes[n] = {**v, "position_mm": to_patient(np.asarray(v["position_mm"])[None] / sp)[0]}
    out.branches = [dataclasses.replace(b, path_mm=to_patient(b.path_mm / sp)) for b in graph.branches]
    return out


def _networkx(graph: VesselGraph):
    import networkx as nx

    g = nx.MultiGraph()
    for n, v in graph.nodes.items():
        x, y, z = (float(c) for c in v["position_mm"])
        g.add_node(int(n), kind=v["kind"], degree=int(v["degree"]), x_mm=x, y_mm=y, z_mm=z)
    for b in graph.branches:
        g.add_edge(b.src, b.dst, key=b.id, branch_id=b.id, kind=b.kind, length_mm=b.length_mm,
                   mean_radius_mm=b.mean_radius_mm, min_radius_mm=b.min_radius_mm, tree=b.tree,
                   path_mm=json.dumps(np.round(b.path_mm, 3).tolist()))
    return g


def write_graphml(graph: VesselGraph, path: str | os.PathLike) -> Path:
    """GraphML for networkx (``nx.read_graphml``): node attributes kind, degree, x_mm, y_mm, z_mm;
    edge attributes branch_id, kind, length_mm, mean_radius_mm, min_radius_mm, tree and path_mm
    (a JSON list of [x, y, z] mm)."""
    import networkx as nx

    nx.write_graphml(_networkx(graph), str(path))
    return Path(path)


def write_vtk_polylines(graph: VesselGraph, path: str | os.PathLike) -> Path:
    """One polyline per branch (XML PolyData, ``.vtp``), points in patient mm; point data
    ``radius_mm``, cell data ``branch_id``, ``length_mm`` and ``tree``."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    points = np.concatenate([b.path_mm for b in graph.branches]) if graph.branches else np.zeros((0, 3))
    radii = np.concatenate([b.radius_mm for b in graph.branches]) if graph.branches else np.zeros(0)
    poly = vtk.vtkPolyData()
    pts = vtk.vtkPoints()
    pts.SetData(numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True))
    poly.SetPoints(pts)
    lines = vtk.vtkCellArray()
    start = 0
    for b in graph.branches:
        n = len(b.path_mm)
        lines.InsertNextCell(n)
        for k in range(n):
            lines.InsertCellPoint(start + k)
        start += n
    poly.SetLines(lines)
    r = numpy_to_vtk(np.ascontiguousarray(radii, dtype=np.float64), deep=True)
    r.SetName("radius_mm")
    poly.GetPointData().AddArray(r)
    for name, values, kind in (("branch_id", [b.id for b in graph.branches], np.int64),
                               ("length_mm", [b.length_mm for b in graph.branches], np.float64),
                               ("tree", [b.tree for b in graph.branches], np.int64)):
        arr = numpy_to_vtk(np.asarray(values, dtype=kind), deep=True)
        arr.SetName(name)
        poly.GetCellData().AddArray(arr)
    writer = vtk.vtkXMLPolyDataWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(poly)
    if writer.Write() != 1:
        raise OSError(f"{path}: VTK could not write the polylines")
    return Path(path)


# ----------------------------------------------------------------------------- graph scores
#: per-case keys :func:`graph_scores` adds to test.py's rows
GRAPH_KEYS: tuple[str, ...] = (
    "bp_true", "bp_pred", "bp_recall_3mm", "bp_precision_3mm",
    *(f"branch_found_{n}" for n in ("lt1", "1to2", "2to3", "ge3")),
    *(f"branch_n_{n}" for n in ("lt1", "1to2", "2to3", "ge3")),
    "largest_tree_pieces",
)
#: a true branch point counts as found when a predicted one lies within this distance
BRANCH_POINT_TOLERANCE_MM = 3.0
#: a true branch counts as found when at least this share of its centreline lies in the prediction
BRANCH_FOUND_SHARE = 0.5


def graph_scores(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float],
                 pred_graph: Optional[VesselGraph] = None,
                 target_graph: Optional[VesselGraph] = None) -> dict[str, float]:
    """What connectivity means to a surgeon, beyond clDice, for one case.

    pred, target: bool (H, W, D); spacing (row, col, slice) mm. Returns (``GRAPH_KEYS``):
    - ``bp_true`` / ``bp_pred``: branch points of each graph; ``bp_recall_3mm``: share of the
      true branch points with a predicted one within 3 mm, ``bp_precision_3mm`` the converse
      (NaN where there is none to count);
    - ``branch_found_<bin>``: share of the true branches, by mean radius (< 1, 1-2, 2-3, >= 3 mm),
      with at least half their centreline inside the prediction; ``branch_n_<bin>`` how many;
    - ``largest_tree_pieces``: connected pieces (26-connectivity) of the prediction inside the
      largest connected true tree (1: one unbroken piece; 0: missed).
    """
    from scipy.spatial import cKDTree

    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    sp = np.asarray(spacing, dtype=np.float64)
    gp = pred_graph if pred_graph is not None else vessel_graph(pred, sp)
    gt = target_graph if target_graph is not None else vessel_graph(target, sp)
    out: dict[str, float] = {}
    bt = np.array([gt.nodes[n]["position_mm"] for n in gt.branch_points]).reshape(-1, 3)
    bp = np.array([gp.nodes[n]["position_mm"] for n in gp.branch_points]).reshape(-1, 3)
    out["bp_true"], out["bp_pred"] = float(len(bt)), float(len(bp))
    tol = BRANCH_POINT_TOLERANCE_MM
    out["bp_recall_3mm"] = (float(np.mean(cKDTree(bp).query(bt)[0] <= tol)) if len(bp) else 0.0) if len(bt) else \
        float("nan")
    out["bp_precision_3mm"] = (float(np.mean(cKDTree(bt).query(bp)[0] <= tol)) if len(bt) else 0.0) if len(bp) else \
        float("nan")
    bins = ((0.0, 1.0, "lt1"), (1.0, 2.0, "1to2"), (2.0, 3.0, "2to3"), (3.0, float("inf"), "ge3"))
    for lo, hi, name in bins:
        found = []
        for b in gt.branches:
            if lo <= b.mean_radius_mm < hi:
                idx = np.round(b.path_mm / sp).astype(int)  # the target graph is in index x spacing mm
                found.append(float(np.mean(pred[idx[:, 0], idx[:, 1], idx[:, 2]])) >= BRANCH_FOUND_SHARE)
        out[f"branch_found_{name}"] = float(np.mean(found)) if found else float("nan")
        out[f"branch_n_{name}"] = float(len(found))
    if target.any():
        lab, n = ndimage.label(target, structure=np.ones((3, 3, 3), bool))
        largest = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
        out["largest_tree_pieces"] = float(ndimage.label(pred & largest, structure=np.ones((3, 3, 3), bool))[1])
    else:
        out["largest_tree_pieces"] = float("nan")
    return out
