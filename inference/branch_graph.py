"""Which tree each branch of a vessel mask's skeleton belongs to: a small graph network (issue 26).

The tree model (:mod:`inference.tree_model`) decides on a 3 mm grid and leans on where a vessel
lies; the vessel voxels it puts in the wrong tree fill whole branches. A branch's tree is a
question of what it connects to, so this step decides per branch, from its neighbours too:

- :func:`skeleton_branches`: the mask's skeleton (:func:`evaluation.metrics.skeleton`) less its
  junctions (skeleton voxels with 3 or more skeleton neighbours, widened by one voxel) falls
  into branches; every mask voxel joins the nearest branch of its own connected piece (a piece
  with no branch is one). Given the true trees, one label per branch leaves about 1% of the
  vessel voxels of a binary model's masks in the wrong tree (docs/RESULTS.md).
- :func:`branch_graph`: per branch the features of :data:`FEATURES` (its size, place in the
  mask's box, radius, length, direction, how its radius changes along it, and the tree model's
  logit over it); branches whose voxels touch (26-neighbours) are joined, with the features of
  :data:`EDGE_FEATURES`.
- :class:`BranchNet`: message passing on that graph (``layers`` rounds, each a residual update
  of every branch from the mean of messages from its neighbours); one logit per branch,
  hepatic minus portal. :class:`BranchModel` averages several trained with different seeds.
- :meth:`BranchModel.voxel_logit`: the averaged logit painted on each branch's voxels, which
  replaces the tree model's before the minimum cut (:func:`inference.trees.cut_trees`).

Arrays are (H, W, D); spacing (row, col, slice) in mm.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from evaluation.metrics import skeleton, skeleton_neighbours
from inference.trees import neighbour_pairs
from utils.boxes import bounding_box
from utils.threads import one_thread

log = logging.getLogger("trees")

#: per-branch features, in this order
FEATURES = ("log_voxels", "row", "col", "slice", "radius_mm", "log_skeleton_voxels",
            "abs_dir_row", "abs_dir_col", "dir_slice", "taper", "mean_logit", "hepatic_share")
#: per-edge features (for the message from branch j to branch i). ``alignment`` is |d_i . d_j| of
#: the directions as the branch features hold them, row and column components taken absolute:
#: parallel branches give 1, and so do mirror images such as (1, 1, 0) and (1, -1, 0); a true
#: angle is left to a later version of the features (it changes the trained networks)
EDGE_FEATURES = ("log_contact", "radius_ratio", "alignment", "slice_step", "radius_step")
_FULL = np.ones((3, 3, 3), dtype=bool)
# the tree model's logit is clipped here before it is averaged over a branch
_LOGIT_CLIP = 10.0


@dataclass
class BranchGraph:
    """The branches of a vessel mask: ``piece`` int32 on the mask's bounding box ``box`` (0
    outside the mask, k + 1 on branch k); ``features`` (n, len(FEATURES)) float32; ``edges``
    (m, 2) int64 of touching branches, i < j; ``contacts`` (m,) the 26-neighbour voxel pairs
    between them."""
    box: Optional[tuple[slice, ...]]
    piece: np.ndarray
    features: np.ndarray
    edges: np.ndarray
    contacts: np.ndarray

    @property
    def n(self) -> int:
        return len(self.features)


def _check(union: np.ndarray, spacing: Sequence[float]) -> None:
    if np.ndim(union) != 3 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"mask must be (H, W, D) with 3 positive spacings, got {np.shape(union)} and {tuple(spacing)}")


def skeleton_branches(union: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """int32 (H, W, D): 0 outside ``union``, k + 1 on the voxels of branch k (module docstring)."""
    return _branches_and_skeleton(union, spacing)[0]


def _branches_and_skeleton(union: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(:func:`skeleton_branches`, the mask's skeleton bool (H, W, D)), one skeleton per piece."""
    _check(union, spacing)
    union = np.asarray(union, dtype=bool)
    out = np.zeros(union.shape, np.int32)
    skeletons = np.zeros(union.shape, bool)
    comps, n_comps = ndimage.label(union, structure=_FULL)
    next_label = 0
    for c, sl in enumerate(ndimage.find_objects(comps), start=1):
        # one connected piece at a time, so that no voxel joins a branch of another piece
        sl = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
        piece = comps[sl] == c
        skel = skeleton(piece)
        skeletons[sl] |= skel
        junctions = ndimage.binary_dilation(skeleton_neighbours(skel) >= 3, structure=_FULL) & skel
        branches, n = ndimage.label(skel & ~junctions, structure=_FULL)
        if n == 0:
            next_label += 1
            out[sl][piece] = next_label
            continue
        _, nearest = ndimage.distance_transform_edt(branches == 0, sampling=spacing, return_indices=True)
        labels = branches[tuple(nearest)]
        out[sl][piece] = labels[piece] + next_label
        next_label += n
    return out, skeletons


def _branch_directions(piece: np.ndarray, skel: np.ndarray, radius: np.ndarray, n: int,
                       spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) unit principal direction of each branch's skeleton voxels (mm; slice component >= 0)
    and (n,) the correlation of the radius with the position along it (> 0: thicker towards
    the higher slices); zeros for branches with fewer than 3 skeleton voxels. A branch within one
    slice has no slice component: its direction's sign, and so its taper's, is arbitrary there (a
    later version of the features should orient it; that changes the trained networks)."""
    dirs = np.zeros((n, 3))
    taper = np.zeros(n)
    pts = np.argwhere(skel)
    owner = piece[skel] - 1
    rad = radius[skel]
    order = np.argsort(owner, kind="stable")
    owner, pts, rad = owner[order], pts[order], rad[order]
    bounds = np.searchsorted(owner, np.arange(n + 1))
    for k in range(n):
        p = pts[bounds[k]:bounds[k + 1]] * spacing
        if len(p) < 3:
            continue
        q = p - p.mean(axis=0)
        v = np.linalg.svd(q, full_matrices=False)[2][0]
        v = -v if v[2] < 0 else v
        dirs[k] = v
        t, r = q @ v, rad[bounds[k]:bounds[k + 1]]
        if t.std() > 0 and r.std() > 0:
            taper[k] = np.corrcoef(t, r)[0, 1]
    return dirs, taper


#: voxels of background around the mask in a branch graph's box: with none, the radius (distance to
#: background) of a piece filling its own box ran on to the box's faces (branch networks saved
#: before this was 1 were trained so, and keep 0: :attr:`BranchModel.box_margin`)
BOX_MARGIN = 1


def branch_graph(union: np.ndarray, logit: np.ndarray, spacing: Sequence[float],
                 box_margin: int = BOX_MARGIN) -> BranchGraph:
    """The branch graph (:class:`BranchGraph`) of the mask ``union`` with the tree model's
    hepatic-minus-portal ``logit`` (float (H, W, D)), on the mask's box widened by ``box_margin``."""
    _check(union, spacing)
    if np.shape(logit) != np.shape(union):
        raise ValueError(f"logit must be shaped like the mask {np.shape(union)}, got {np.shape(logit)}")
    union = np.asarray(union, dtype=bool)
    box = bounding_box(union, margin=box_margin)
    empty = np.zeros((0, len(FEATURES)), np.float32)
    if box is None:
        return BranchGraph(None, np.zeros((0, 0, 0), np.int32), empty, np.zeros((0, 2), np.int64), np.zeros(0))
    sp = np.asarray(spacing, dtype=float)
    union = union[box]
    logit = np.clip(np.asarray(logit, dtype=np.float64)[box], -_LOGIT_CLIP, _LOGIT_CLIP)
    if not np.isfinite(logit[union]).all():
        raise ValueError("logit is not finite inside the mask")
    piece, skel = _branches_and_skeleton(union, sp)
    n = int(piece.max())
    radius = ndimage.distance_transform_edt(union, sampling=sp)

    def per_branch(values: np.ndarray, where: np.ndarray) -> np.ndarray:
        owner = piece[where] - 1
        total = np.bincount(owner, weights=values[where], minlength=n)
        return total / np.maximum(np.bincount(owner, minlength=n), 1)

    extent = np.asarray(union.shape) * sp
    grid = np.indices(union.shape, dtype=np.float32)
    voxels = np.bincount(piece[union] - 1, minlength=n).astype(float)
    skel_voxels = np.bincount(piece[skel] - 1, minlength=n).astype(float)
    dirs, taper = _branch_directions(piece, skel, radius, n, sp)
    features = np.stack([
        np.log1p(voxels),
        *[per_branch(grid[a] * sp[a], union) / extent[a] for a in range(3)],
        per_branch(radius, skel),
        np.log1p(skel_voxels),
        np.abs(dirs[:, 0]), np.abs(dirs[:, 1]), dirs[:, 2],
        taper,
        per_branch(logit, union) / 5.0,
        per_branch((logit > 0).astype(float), union),
    ], axis=1).astype(np.float32)
    # touching branches: every 26-neighbour pair of mask voxels on two branches
    owner = piece[union].astype(np.int64)
    pairs = []
    for _, i, j in neighbour_pairs(union):
        a, b = owner[i], owner[j]
        keep = a != b
        pairs.append(np.stack([np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])], axis=1) - 1)
    edges, contacts = np.unique(np.concatenate(pairs), axis=0, return_counts=True)
    return BranchGraph(box, piece, features, edges.reshape(-1, 2), contacts.astype(float))


def edge_features(graph: BranchGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, target, features): both directions of every edge, (2m,) int64 each, and
    (2m, len(EDGE_FEATURES)) float32 for the message from ``source`` to ``target``."""
    i, j = graph.edges[:, 0], graph.edges[:, 1]
    x = graph.features
    col = {name: k for k, name in enumerate(FEATURES)}
    r = x[:, col["radius_mm"]]
    d = x[:, [col["abs_dir_row"], col["abs_dir_col"], col["dir_slice"]]]

    def one_way(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        return np.stack([
            np.log1p(graph.contacts),
            np.minimum(r[src], r[dst]) / np.maximum(np.maximum(r[src], r[dst]), 1e-3),
            np.abs((d[src] * d[dst]).sum(axis=1)),
            x[src, col["slice"]] - x[dst, col["slice"]],
            r[src] - r[dst],
        ], axis=1)

    source = np.concatenate([i, j]).astype(np.int64)
    target = np.concatenate([j, i]).astype(np.int64)
    feats = np.concatenate([one_way(i, j), one_way(j, i)]).astype(np.float32) if len(i) else \
        np.zeros((0, len(EDGE_FEATURES)), np.float32)
    return source, target, feats


def branch_truth(graph: BranchGraph, labels: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The training target of a branch graph from the true label map (H, W, D) (1 portal, 2
    hepatic) on the grid of the mask it was built from, ``spacing`` (row, col, slice) mm: every
    mask voxel takes the tree of the nearest true vessel voxel in mm (slices are often 2-4 times
    farther apart than pixels), each branch the tree of most of its voxels. Returns (n,) float32,
    1 hepatic, and (n,) its voxel count (the loss's weight)."""
    labels = np.asarray(labels)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {tuple(spacing)}")
    if graph.box is None:
        return np.zeros(0, np.float32), np.zeros(0)
    if labels.ndim != 3 or not (labels > 0).any():
        raise ValueError(f"labels must be an (H, W, D) label map with vessels, got shape {labels.shape}")
    _, nearest = ndimage.distance_transform_edt(labels == 0, sampling=[float(v) for v in spacing],
                                                return_indices=True)
    own = labels[tuple(nearest)][graph.box]
    if own.shape != graph.piece.shape:
        raise ValueError(f"labels of shape {labels.shape} do not hold the graph's box {graph.box}")
    inside = graph.piece > 0
    owner = graph.piece[inside] - 1
    hepatic = np.bincount(owner, weights=(own[inside] == 2), minlength=graph.n)
    count = np.bincount(owner, minlength=graph.n).astype(float)
    return (hepatic > count / 2).astype(np.float32), count


class BranchNet(nn.Module):
    """Message passing on a branch graph: input (n, len(FEATURES)) normalised features, edges
    as (source, target, (2m, len(EDGE_FEATURES))); output (n,) hepatic-minus-portal logits."""

    def __init__(self, hidden: int = 32, layers: int = 8, dropout: float = 0.3) -> None:
        super().__init__()
        if hidden < 1 or layers < 1 or not 0 <= dropout < 1:
            raise ValueError(f"hidden and layers must be >= 1 and dropout in [0, 1), got {hidden}, {layers}, {dropout}")
        self.encode = nn.Sequential(nn.Linear(len(FEATURES), hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.message = nn.ModuleList(nn.Sequential(nn.Linear(2 * hidden + len(EDGE_FEATURES), hidden), nn.ReLU(),
                                                   nn.Linear(hidden, hidden)) for _ in range(layers))
        self.update = nn.ModuleList(nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                                  nn.Linear(hidden, hidden)) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                edge: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != len(FEATURES) or edge.shape != (len(source), len(EDGE_FEATURES)):
            raise ValueError(f"features must be (n, {len(FEATURES)}) and edge features (2m, {len(EDGE_FEATURES)}), "
                             f"got {tuple(x.shape)} and {tuple(edge.shape)}")
        h = self.encode(x)
        degree = torch.zeros(len(x), 1, dtype=x.dtype).index_add_(
            0, target, torch.ones(len(target), 1, dtype=x.dtype)).clamp_min(1)
        for message, update, norm in zip(self.message, self.update, self.norm):
            m = message(torch.cat([h[target], h[source], edge], dim=1))
            mean = torch.zeros_like(h).index_add_(0, target, m) / degree
            h = norm(h + update(torch.cat([h, mean], dim=1)))
        return self.out(h)[:, 0]


@dataclass
class BranchConfig:
    """How the branch networks are built and trained; saved in the tree model file."""
    hidden: int = 32
    layers: int = 8
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1e-3
    epochs: int = 30
    seeds: Sequence[int] = field(default_factory=lambda: tuple(range(10)))

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        if self.epochs < 1 or not self.seeds or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("epochs must be >= 1, seeds not empty, lr > 0 and weight_decay >= 0")
        BranchNet(self.hidden, self.layers, self.dropout)  # checks the network's settings


def _inputs(graph: BranchGraph, mean: np.ndarray, std: np.ndarray) -> tuple[torch.Tensor, ...]:
    source, target, edge = edge_features(graph)
    x = (graph.features - mean) / std
    return (torch.from_numpy(x.astype(np.float32)), torch.from_numpy(source), torch.from_numpy(target),
            torch.from_numpy(edge))


@dataclass
class BranchModel:
    """Branch networks trained with different seeds, averaged; with the features' training mean
    and standard deviation."""
    nets: list[BranchNet]
    mean: np.ndarray
    std: np.ndarray
    config: BranchConfig
    #: the box margin of the graphs they were trained on (:data:`BOX_MARGIN`; 0 in older files)
    box_margin: int = BOX_MARGIN

    def logits(self, graph: BranchGraph) -> np.ndarray:
        """(n,) float32: the networks' mean hepatic-minus-portal logit per branch."""
        if graph.n == 0:
            return np.zeros(0, np.float32)
        inputs = _inputs(graph, self.mean, self.std)
        # one thread as in training, so that the logits do not depend on the thread count
        with torch.no_grad(), one_thread():
            return torch.stack([net(*inputs) for net in self.nets]).mean(0).numpy().astype(np.float32)

    def voxel_logit(self, union: np.ndarray, logit: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """float32 (H, W, D): each voxel of ``union`` given its branch's logit (:meth:`logits` of
        the branch graph of ``union`` and the tree model's ``logit``); 0 outside the mask."""
        graph = branch_graph(union, logit, spacing, self.box_margin)
        out = np.zeros(np.shape(union), np.float32)
        if graph.n:
            per_branch = np.concatenate([[0.0], self.logits(graph)]).astype(np.float32)
            out[graph.box] = per_branch[graph.piece]
        return out

    def state(self) -> dict:
        return {"config": asdict(self.config), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "features": list(FEATURES), "edge_features": list(EDGE_FEATURES), "box_margin": self.box_margin,
                "state_dicts": [{k: v.detach().cpu() for k, v in net.state_dict().items()} for net in self.nets]}

    @classmethod
    def from_state(cls, doc: dict, where: str = "") -> "BranchModel":
        """The model of :meth:`state`; ValueError naming ``where`` when it does not fit this code."""
        if tuple(doc.get("features", ())) != FEATURES or tuple(doc.get("edge_features", ())) != EDGE_FEATURES:
            raise ValueError(f"{where}: its branch networks were trained on other branch features")
        cfg = BranchConfig(**doc["config"])
        nets = []
        for sd in doc["state_dicts"]:
            net = BranchNet(cfg.hidden, cfg.layers, cfg.dropout)
            try:
                net.load_state_dict(sd)
            except RuntimeError as e:
                raise ValueError(f"{where}: branch network weights do not fit ({str(e).splitlines()[0]})") from None
            nets.append(net.eval())
        return cls(nets, np.asarray(doc["mean"], np.float32), np.asarray(doc["std"], np.float32), cfg,
                   int(doc.get("box_margin", 0)))


def train_branch_model(graphs: Sequence[BranchGraph], truths: Sequence[tuple[np.ndarray, np.ndarray]],
                       config: BranchConfig, progress: bool = True) -> tuple[BranchModel, list[float]]:
    """Train one :class:`BranchNet` per seed of ``config`` on the graphs and their
    :func:`branch_truth`: AdamW, ``epochs`` passes over the graphs in a seeded order, one graph
    per step, binary cross-entropy per branch weighted by its share of the graph's voxels.
    Returns the model and each seed's mean loss of its last pass."""
    from tqdm import tqdm

    data = [(g, t) for g, t in zip(graphs, truths) if g.n]
    if len(graphs) != len(truths) or not data:
        raise ValueError(f"need graphs with branches and one truth each, got {len(graphs)} graphs and {len(truths)} truths")
    every = np.concatenate([g.features for g, _ in data])
    mean, std = every.mean(axis=0), every.std(axis=0) + 1e-6
    inputs = [(_inputs(g, mean, std), torch.from_numpy(t[0]), torch.from_numpy(t[1] / t[1].sum()).float())
              for g, t in data]
    nets, last = [], []
    with one_thread():
        for seed in tqdm(config.seeds, desc="branch networks", disable=not progress):
            net, loss = _train_one(inputs, config, seed)
            nets.append(net)
            last.append(loss)
    return BranchModel(nets, mean.astype(np.float32), std.astype(np.float32), config), last


def _train_one(inputs: Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]],
               config: BranchConfig, seed: int) -> tuple[BranchNet, float]:
    """One network of :func:`train_branch_model` and its mean loss of the last pass. Each item of
    ``inputs`` is one graph: ((features (n, len(FEATURES)) normalised, source (2m,), target (2m,),
    edge features (2m, len(EDGE_FEATURES))), truth (n,) float32 1 hepatic, weight (n,) float32
    each branch's share of the graph's voxels); the loss per graph is the weighted sum of the
    branches' binary cross-entropies."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = BranchNet(config.hidden, config.layers, config.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    net.train()
    for _ in range(config.epochs):
        total = 0.0
        for k in rng.permutation(len(inputs)):
            x, y, w = inputs[k]
            loss = (F.binary_cross_entropy_with_logits(net(*x), y, reduction="none") * w).sum()
            if not torch.isfinite(loss):
                raise RuntimeError(f"branch network (seed {seed}): loss is {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.item())
    return net.eval(), total / len(inputs)
