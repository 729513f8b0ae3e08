"""The vessel branch graph on shapes of known lengths and radii (issue 28)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skan")
from evaluation.graph import vessel_graph, write_graphml, write_vtk_polylines  # noqa: E402


def tube(shape, a, b, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Voxels (H, W, D) whose centre lies within ``radius`` mm of the segment a-b (mm)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    a, b = np.asarray(a, float), np.asarray(b, float)
    t = np.clip(((grid - a) @ (b - a)) / float((b - a) @ (b - a)), 0, 1)
    d = np.linalg.norm(grid - (a + t[..., None] * (b - a)), axis=-1)
    return d <= radius


def test_straight_tube_is_one_branch_of_its_length_and_radius():
    mask = tube((24, 24, 90), (12, 12, 5), (12, 12, 84), 3.0)
    g = vessel_graph(mask, (1.0, 1.0, 1.0))
    assert len(g.branches) == 1 and len(g.end_points) == 2 and not g.branch_points
    b = g.branches[0]
    assert b.kind == "end-end"
    assert b.length_mm == pytest.approx(79.0, rel=0.05)
    assert abs(b.mean_radius_mm - 3.0) <= 0.5


def test_y_has_one_branch_point_and_known_lengths_and_radii():
    """A trunk of 50 mm and two arms of 50 mm at +-45 degrees, radius 2.5 mm, on a 0.8 mm grid in
    plane and 1.0 mm between slices."""
    sp = (0.8, 0.8, 1.0)
    shape = (130, 140, 14)  # 104 x 112 x 14 mm
    j = np.array([56.0, 56.0, 7.0])  # the junction, mm
    ends = [j + np.array([-50.0, 0, 0]), j + 50.0 * np.array([np.sqrt(0.5), -np.sqrt(0.5), 0]),
            j + 50.0 * np.array([np.sqrt(0.5), np.sqrt(0.5), 0])]
    mask = np.zeros(shape, bool)
    for e in ends:
        mask |= tube(shape, j, e, 2.5, sp)
    labels = np.zeros(shape, np.int16)
    labels[mask] = 1
    g = vessel_graph(mask, sp, labels=labels)
    assert len(g.branch_points) == 1 and len(g.end_points) == 3 and len(g.branches) == 3
    for b in g.branches:
        assert b.kind == "junction-end" and b.tree == 1
        assert b.length_mm == pytest.approx(50.0, rel=0.05), b.length_mm
        assert abs(b.mean_radius_mm - 2.5) <= 0.4  # half the in-plane voxel
    # the branch point lies at the junction, in patient mm
    (bp,) = g.branch_points
    assert np.linalg.norm(g.nodes[bp]["position_mm"] - j) < 2.5


def test_a_ring_is_reported_as_a_loop(tmp_path):
    shape = (60, 60, 9)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    rho = np.hypot(grid[..., 0] - 30, grid[..., 1] - 30)
    mask = np.hypot(rho - 20, grid[..., 2] - 4) <= 2.0
    g = vessel_graph(mask, (1.0, 1.0, 1.0))
    assert len(g.branches) == 1 and g.branches[0].kind == "loop" and not g.end_points
    assert g.branches[0].length_mm == pytest.approx(2 * np.pi * 20, rel=0.05)


def test_graph_files_read_back(tmp_path):
    import networkx as nx
    import vtk

    mask = tube((20, 20, 40), (10, 10, 3), (10, 10, 36), 2.0)
    g = vessel_graph(mask, (0.7, 0.7, 1.5))
    write_graphml(g, tmp_path / "g.graphml")
    back = nx.read_graphml(tmp_path / "g.graphml")
    assert back.number_of_nodes() == 2 and back.number_of_edges() == 1
    (_, _, attrs), = back.edges(data=True)
    assert attrs["length_mm"] == pytest.approx(g.branches[0].length_mm)
    assert np.allclose(json.loads(attrs["path_mm"]), g.branches[0].path_mm, atol=1e-3)
    write_vtk_polylines(g, tmp_path / "g.vtp")
    reader = vtk.vtkXMLPolyDataReader()
    reader.SetFileName(str(tmp_path / "g.vtp"))
    reader.Update()
    poly = reader.GetOutput()
    assert poly.GetNumberOfLines() == 1 and poly.GetNumberOfPoints() == len(g.branches[0].path_mm)
    r = poly.GetPointData().GetArray("radius_mm")
    assert r is not None and r.GetValue(0) == pytest.approx(g.branches[0].radius_mm[0])


def test_empty_mask_and_bad_input():
    g = vessel_graph(np.zeros((8, 8, 8), bool), (1, 1, 1))
    assert g.branches == [] and g.nodes == {}
    # specks whose skeletons are single voxels have no branch, alone or beside a vessel
    specks = np.zeros((30, 30, 30), bool)
    specks[5:8, 5:10, 4] = specks[20:23, 20:25, 15] = True
    g = vessel_graph(specks, (1, 1, 1))
    assert g.branches == [] and g.nodes == {}
    vessel = specks.copy()
    vessel[12:15, 12:15, 2:28] = True  # a 3 x 3 rod along the slices
    g = vessel_graph(vessel, (1, 1, 1))
    assert len(g.branches) == 1 and g.branches[0].length_mm > 20
    with pytest.raises(ValueError, match="spacing must be 3 positive numbers"):
        vessel_graph(np.zeros((8, 8, 8), bool), (1, 0, 1))
    with pytest.raises(ValueError, match=r"mask must be \(H, W, D\)"):
        vessel_graph(np.zeros((8, 8), bool), (1, 1, 1))


def test_graph_scores_worked_cases():
    from evaluation.graph import graph_scores

    sp = (1.0, 1.0, 1.0)
    shape = (100, 100, 9)
    j = np.array([50.0, 50.0, 4.0])
    ends = [j + np.array([-40.0, 0, 0]), j + 40.0 * np.array([np.sqrt(0.5), -np.sqrt(0.5), 0]),
            j + 40.0 * np.array([np.sqrt(0.5), np.sqrt(0.5), 0])]
    truth = np.zeros(shape, bool)
    arms = [tube(shape, j, e, 2.8, sp) for e in ends]
    for a in arms:
        truth |= a
    # the prediction equals the truth: everything found, one piece
    s = graph_scores(truth, truth, sp)
    assert s["bp_true"] == s["bp_pred"] == 1 and s["bp_recall_3mm"] == s["bp_precision_3mm"] == 1.0
    assert s["branch_n_2to3"] == 3 and s["branch_found_2to3"] == 1.0 and s["largest_tree_pieces"] == 1
    assert np.isnan(s["branch_found_lt1"]) and s["branch_n_lt1"] == 0
    # one arm missed and the trunk cut by a 6-voxel gap: no branch point, 2 of 3 branches found,
    # the tree in 2 pieces
    pred = arms[0] | arms[1]
    pred[30:36] = False  # a gap across the trunk (rows 30-35)
    s = graph_scores(pred, truth, sp)
    assert s["bp_pred"] == 0 and s["bp_recall_3mm"] == 0.0 and np.isnan(s["bp_precision_3mm"])
    assert s["branch_found_2to3"] == pytest.approx(2 / 3) and s["largest_tree_pieces"] == 2


def test_test_py_graph_option_reports_scores_and_graphs(tiny_dataset, tmp_path, one_thread):
    import csv

    import networkx as nx
    import torch

    from evaluation.graph import GRAPH_KEYS, graph_scores
    from evaluation.runner import run_evaluation
    from networks.checkpoint import save_checkpoint
    from networks.e2e import build_segmenter
    from utils.h5io import read_volume

    torch.manual_seed(0)
    kw = {"base_channels": 4, "depth": 2}
    model = build_segmenter("unet", "none", 1, kw)
    with torch.no_grad():  # a model that marks every bright voxel: its mask is the tubes and some noise
        last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.zero_()
        last.bias.fill_(5.0)
    path = save_checkpoint(tmp_path / "m.pth", model, model_name="unet", model_kwargs=kw, salience="none", config={},
                           epoch=1, iteration=1, best_metric=0.0, img_size=[32, 32]) or tmp_path / "m.pth"
    ds = tiny_dataset
    rep = run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=path,
                         eval_roi="liver", device="cpu", graph=True)
    (row,) = list(csv.DictReader(open(rep.output / "per_case.csv")))
    assert set(GRAPH_KEYS) <= set(row)
    vol = read_volume(ds.paths.volume("case0005"))
    liver = vol.liver.astype(bool)
    want = graph_scores(liver, vol.label.astype(bool) & liver, vol.spacing)  # the model marks the whole liver
    for k in GRAPH_KEYS:
        a, b = float(row[k]), want[k]
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b), k
    assert nx.read_graphml(rep.output / "graphs" / "case0005_true.graphml").number_of_edges() >= 1
    # a report without graph scores is made again when they are asked for
    plain = run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=path,
                           eval_roi="liver", device="cpu", output=tmp_path / "plain")
    again = run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=path,
                           eval_roi="liver", device="cpu", output=tmp_path / "plain", graph=True)
    assert not plain.skipped and not again.skipped and (tmp_path / "plain" / "graphs").is_dir()
