"""inference/branch_graph.py and train_branch_model.py: a vessel mask's skeleton branches, their
features and graph, the branch networks, their file, and test.py with them (issue 26)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from inference.branch_graph import (EDGE_FEATURES, FEATURES, BranchConfig, BranchModel, BranchNet, branch_graph,
                                    branch_truth, edge_features, skeleton_branches, train_branch_model)

pytestmark = pytest.mark.usefixtures("one_thread")
COL = {name: k for k, name in enumerate(FEATURES)}


def tube(shape, p0, p1, radius, spacing=(1.0, 1.0, 1.0)):
    """Voxels within ``radius`` mm of the segment p0-p1 (voxel coordinates)."""
    g = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    a, b = np.multiply(p0, spacing), np.multiply(p1, spacing)
    length2 = (b - a) @ (b - a)
    t = np.clip(((g - a) @ (b - a)) / length2, 0, 1) if length2 else np.zeros(shape)
    return np.linalg.norm(g - (a + t[..., None] * (b - a)), axis=-1) <= radius


def y_shape(shape=(48, 48, 48)):
    """Three arms of radius 2.5 from the centre: towards low rows, and towards high rows at low and
    high columns."""
    c = (24, 24, 24)
    arms = [tube(shape, c, end, 2.5) for end in ((4, 24, 24), (40, 8, 24), (40, 40, 24))]
    return arms, arms[0] | arms[1] | arms[2]


def test_a_y_falls_into_three_branches_that_cover_it_and_touch():
    arms, union = y_shape()
    piece = skeleton_branches(union, (1.0, 1.0, 1.0))
    assert np.array_equal(piece > 0, union)
    assert piece.max() == 3
    # away from the junction each arm is one branch, and a different one for each arm
    far = [arm & ~tube(union.shape, (24, 24, 24), (24, 24, 24), 8.0) for arm in arms]
    owners = [np.unique(piece[f]) for f in far]
    assert all(len(o) == 1 for o in owners) and len({int(o[0]) for o in owners}) == 3
    graph = branch_graph(union, np.zeros(union.shape), (1.0, 1.0, 1.0))
    assert graph.n == 3 and graph.features.shape == (3, len(FEATURES))
    assert graph.edges.tolist() == [[0, 1], [0, 2], [1, 2]] and (graph.contacts > 0).all()
    source, target, feats = edge_features(graph)
    assert feats.shape == (6, len(EDGE_FEATURES)) and sorted(zip(source, target)) == sorted(
        [(0, 1), (0, 2), (1, 2), (1, 0), (2, 0), (2, 1)])
    # worked answers: arms of one radius in one slice; the arm along the rows against the two
    # diagonal ones, |(1, 0, 0) . (0.707, 0.707, 0)| = 0.707 (the diagonals fold onto each other: 1)
    e = {name: k for k, name in enumerate(EDGE_FEATURES)}
    row_arm = int(np.argmax(graph.features[:, COL["abs_dir_row"]] - graph.features[:, COL["abs_dir_col"]]))
    for (i, j), f in zip(zip(source, target), feats):
        assert f[e["radius_ratio"]] == pytest.approx(1.0, abs=0.1)
        assert f[e["slice_step"]] == pytest.approx(0.0, abs=0.02) and f[e["radius_step"]] == pytest.approx(0.0, abs=0.3)
        assert f[e["alignment"]] == pytest.approx(0.707 if row_arm in (i, j) else 1.0, abs=0.05)
        assert f[e["log_contact"]] == pytest.approx(np.log1p(graph.contacts[graph.edges.tolist().index(sorted([i, j]))]))


def test_separate_pieces_never_share_a_branch_and_a_dot_is_a_branch():
    shape = (30, 30, 20)
    a = tube(shape, (5, 5, 2), (5, 5, 17), 2.0)
    b = tube(shape, (20, 20, 2), (20, 20, 17), 2.0)
    dot = np.zeros(shape, bool)
    dot[12:14, 25:27, 9:11] = True
    piece = skeleton_branches(a | b | dot, (1.0, 1.0, 1.0))
    assert piece.max() == 3
    assert len(np.unique(piece[a])) == len(np.unique(piece[b])) == len(np.unique(piece[dot])) == 1
    assert len({int(piece[a][0]), int(piece[b][0]), int(piece[dot][0])}) == 3


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.5, 2.0)])
def test_a_tube_along_the_slices_has_its_radius_direction_and_logit(spacing):
    shape = (40, 40, 30) if spacing[2] == 1.0 else (60, 60, 30)
    centre = [n // 2 for n in shape[:2]]
    union = tube(shape, (*centre, 2), (*centre, shape[2] - 3), 4.0, spacing)
    logit = np.full(shape, 2.5)
    graph = branch_graph(union, logit, spacing)
    assert graph.n == 1
    f = graph.features[0]
    # the skeleton's distance to the wall is the radius, up to a voxel
    assert f[COL["radius_mm"]] == pytest.approx(4.0, abs=max(spacing[:2]))
    assert f[COL["dir_slice"]] == pytest.approx(1.0, abs=1e-3) and f[COL["abs_dir_row"]] < 0.05
    assert f[COL["mean_logit"]] == pytest.approx(0.5) and f[COL["hepatic_share"]] == 1.0
    assert f[COL["slice"]] == pytest.approx(0.5, abs=0.05)  # in the middle of the mask's box


def test_taper_says_which_end_is_thicker():
    shape = (40, 40, 40)
    cone = np.zeros(shape, bool)
    for z in range(4, 36):
        cone |= tube(shape, (20, 20, z), (20, 20, z), 1.5 + 4.0 * (z - 4) / 32)
    thick_up = branch_graph(cone, np.zeros(shape), (1.0, 1.0, 1.0))
    thick_down = branch_graph(cone[:, :, ::-1], np.zeros(shape), (1.0, 1.0, 1.0))
    assert thick_up.n == thick_down.n == 1
    assert thick_up.features[0, COL["taper"]] > 0.8 and thick_down.features[0, COL["taper"]] < -0.8


def test_branch_truth_gives_each_branch_its_trees_majority():
    arms, union = y_shape()
    labels = np.zeros(union.shape, np.uint8)
    labels[arms[0] | arms[1]] = 1
    labels[arms[2] & ~(arms[0] | arms[1])] = 2
    # the mask is one voxel wider than the truth: its rim takes the tree of the nearest true voxel
    from scipy import ndimage
    mask = ndimage.binary_dilation(union)
    graph = branch_graph(mask, np.zeros(mask.shape), (1.0, 1.0, 1.0))
    target, weight = branch_truth(graph, labels, (1.0, 1.0, 1.0))
    end_of = {int(np.bincount(graph.piece[arm[graph.box]]).argmax()) - 1: k for k, arm in enumerate(arms)}
    assert sorted(end_of.values()) == [0, 1, 2]
    assert [target[b] for b in sorted(end_of, key=end_of.get)] == [0.0, 0.0, 1.0]
    assert weight.sum() == mask.sum()
    with pytest.raises(ValueError, match="label map with vessels"):
        branch_truth(graph, np.zeros_like(labels), (1.0, 1.0, 1.0))


def random_graph_inputs(n=7, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, len(FEATURES))).astype(np.float32))
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.4] + [(0, 1)])
    source = torch.from_numpy(np.concatenate([pairs[:, 0], pairs[:, 1]]))
    target = torch.from_numpy(np.concatenate([pairs[:, 1], pairs[:, 0]]))
    edge = torch.from_numpy(rng.normal(size=(len(source), len(EDGE_FEATURES))).astype(np.float32))
    return x, source, target, edge


def test_the_network_is_equivariant_to_the_order_of_the_branches_and_learns():
    net = BranchNet(hidden=8, layers=3, dropout=0.0).eval()
    x, source, target, edge = random_graph_inputs()
    perm = torch.from_numpy(np.random.default_rng(1).permutation(len(x)))
    inverse = torch.argsort(perm)
    out = net(x, source, target, edge)
    out_perm = net(x[perm], inverse[source], inverse[target], edge)
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ValueError, match="features must be"):
        net(x[:, :3], source, target, edge)
    with pytest.raises(ValueError, match="dropout"):
        BranchNet(dropout=1.0)


def crossing_case(seed):
    """Two tubes of different trees that touch, in a random order of rows; the tree model's logit
    says each voxel's tree with noise."""
    rng = np.random.default_rng(seed)
    shape = (36, 36, 24)
    r0, r1 = (8, 26) if rng.random() < 0.5 else (26, 8)
    portal = tube(shape, (r0, 4, 12), (r0, 31, 12), 2.5) | tube(shape, (r0, 18, 12), (17, 18, 12), 2.5)
    hepatic = tube(shape, (r1, 4, 12), (r1, 31, 12), 2.5) & ~portal
    labels = np.zeros(shape, np.uint8)
    labels[portal], labels[hepatic] = 1, 2
    logit = np.where(labels == 2, 2.0, -2.0) + rng.normal(0, 0.5, shape)
    union = labels > 0
    graph = branch_graph(union, logit, (1.0, 1.0, 1.0))
    return graph, branch_truth(graph, labels, (1.0, 1.0, 1.0)), union, logit, labels


def test_branch_networks_learn_a_worked_example_and_round_trip(monkeypatch):
    data = [crossing_case(s) for s in range(4)]
    cfg = BranchConfig(hidden=8, layers=2, dropout=0.0, lr=1e-2, epochs=40, seeds=(0, 1))
    model, losses = train_branch_model([d[0] for d in data], [d[1] for d in data], cfg, progress=False)
    assert len(model.nets) == 2 and len(losses) == 2 and max(losses) < 0.2
    graph, (target, _), union, logit, labels = crossing_case(7)
    assert np.array_equal(model.logits(graph) > 0, target > 0.5)
    voxel = model.voxel_logit(union, logit, (1.0, 1.0, 1.0))
    # one value per branch, on the mask only
    assert (voxel[~union] == 0).all()
    inside = graph.piece > 0
    per_branch = {int(b): np.unique(voxel[graph.box][inside & (graph.piece == b)]) for b in np.unique(graph.piece[inside])}
    assert all(len(v) == 1 for v in per_branch.values())
    back = BranchModel.from_state(model.state(), "here")
    np.testing.assert_allclose(back.logits(graph), model.logits(graph), atol=1e-6)
    assert back.config == cfg and back.box_margin == model.box_margin == 1
    # networks saved before the box margin existed were trained on graphs without one, and keep it
    old = model.state()
    del old["box_margin"]
    older = BranchModel.from_state(old, "old")
    assert older.box_margin == 0
    import inference.branch_graph as bg

    seen = []
    monkeypatch.setattr(bg, "branch_graph", lambda *a: seen.append(a[3]) or branch_graph(*a))
    older.voxel_logit(union, logit, (1.0, 1.0, 1.0))
    back.voxel_logit(union, logit, (1.0, 1.0, 1.0))
    assert seen == [0, 1]
    bad = model.state()
    bad["features"] = bad["features"][:-1]
    with pytest.raises(ValueError, match="where: its branch networks were trained on other branch features"):
        BranchModel.from_state(bad, "where")
    with pytest.raises(ValueError, match="seeds not empty"):
        BranchConfig(seeds=())


def test_branch_networks_train_and_run_on_one_thread_and_restore_the_count(monkeypatch):
    # with 2 threads, the same training gave other networks in another process; one thread does not
    seen = []
    forward = BranchNet.forward

    def spy(self, *args):
        seen.append(torch.get_num_threads())
        return forward(self, *args)

    monkeypatch.setattr(BranchNet, "forward", spy)
    data = [crossing_case(s) for s in range(2)]
    cfg = BranchConfig(hidden=8, layers=2, dropout=0.0, epochs=2, seeds=(0,))
    torch.set_num_threads(2)  # the module's one_thread fixture restores it afterwards
    model, _ = train_branch_model([d[0] for d in data], [d[1] for d in data], cfg, progress=False)
    assert torch.get_num_threads() == 2
    model.logits(data[0][0])
    assert torch.get_num_threads() == 2
    assert len(seen) == 5 and set(seen) == {1}
    # and the count comes back when training fails
    graph, truth = data[0][0], data[0][1]
    graph.features[0, 0] = np.nan
    with pytest.raises(RuntimeError, match="loss is nan"):
        train_branch_model([graph], [truth], cfg, progress=False)
    assert torch.get_num_threads() == 2


def test_empty_masks_give_empty_graphs():
    graph = branch_graph(np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5)), (1.0, 1.0, 1.0))
    assert graph.n == 0 and graph.box is None
    with pytest.raises(ValueError, match="logit must be shaped"):
        branch_graph(np.zeros((5, 5, 5), bool), np.zeros((5, 5)), (1.0, 1.0, 1.0))


def test_train_branch_model_cli_adds_networks_that_test_py_uses(tree_data, tmp_path, capsys):
    import train_branch_model
    from evaluation.runner import run_evaluation
    from inference.tree_model import load_tree_model
    from tests.test_tree_model import binary_and_tree_model

    _, tree_file, data = binary_and_tree_model(tree_data, tmp_path)
    run_evaluation(**data, output=tmp_path / "preds", save_pred="h5", pred_kind="mask")
    out = tmp_path / "with_branches.pth"
    args = ["--tree_model", str(tree_file), "--data", str(tree_data / "data"), "phantom", str(tmp_path / "preds"),
            "--out", str(out), "--seeds", "0,1", "--epochs", "2"]
    assert train_branch_model.main(args) == 0
    assert f"tree model with branch networks: {out}" in capsys.readouterr().out
    model = load_tree_model(out)
    assert model.branches is not None and len(model.branches.nets) == 2
    assert model.info["cases"] == ["case0"] and model.info["branches"]["tree_model_sha256"] == load_tree_model(
        tree_file).sha256
    # the vessel model whose masks they learnt, from the masks' report
    from utils.provenance import file_sha256

    assert model.info["branches"]["vessel_model_sha256"] == [file_sha256(data["model_path"])]
    side = json.loads(out.with_suffix(".pth.json").read_text())
    assert len(side["info"]["cases"]) == 1 and len(side["last_pass_losses"]) == 2
    # test.py with it: voxel by voxel, each branch of the binary model's mask is one tree
    res = run_evaluation(**data, output=tmp_path / "eval", tree_model=out, tree_smoothness=0.0, save_pred="h5",
                         pred_kind="mask")
    assert res.rows[0]["voxels_pred"] == res.rows[0]["portal_voxels_pred"] + res.rows[0]["hepatic_voxels_pred"]
    # the labels written are the sign of the branch networks' logit, not of the tree model's own
    from inference.trees import cut_trees
    from utils.h5io import DatasetPaths, read_volume
    case = res.rows[0]["case"]
    with h5py.File(tmp_path / "eval" / "predictions" / f"{case}_pred.h5", "r") as f:
        written = f["mask"][()]
    vol = read_volume(DatasetPaths.of(tree_data / "data", "phantom", tree_data / "list").volume(case))
    union = written > 0
    logit = model.hepatic_minus_portal(vol.image, union, vol.spacing)
    own = model.network_logit(vol.image, union, vol.spacing)
    np.testing.assert_array_equal(logit, model.branches.voxel_logit(union, own, vol.spacing))
    assert np.array_equal(written, cut_trees(union, logit, vol.spacing, 0.0))
    before = out.read_bytes()
    assert train_branch_model.main(args) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert train_branch_model.main(args[:5] + [str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pth")]) == 2
    assert "no predictions/<case>_pred.h5" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()
    with pytest.raises(ValueError, match="--seeds must be"):
        train_branch_model.parse_seeds("a-b")
    assert train_branch_model.parse_seeds("3-5") == (3, 4, 5) and train_branch_model.parse_seeds("7") == (7,)


def test_branch_truth_takes_the_nearest_true_vessel_in_mm():
    """Slices 2.5 mm apart, pixels 0.7 mm: a mask branch with a portal vessel two slices (5 mm) away
    and a hepatic one three rows (2.1 mm) away is hepatic (in voxels it would be portal)."""
    sp, shape = (0.7, 0.7, 2.5), (24, 24, 16)
    labels = np.zeros(shape, np.uint8)
    labels[12, 4:20, 12] = 1
    labels[15, 4:20, 10] = 2
    mask = np.zeros(shape, bool)
    mask[12, 4:20, 10] = True
    graph = branch_graph(mask, np.zeros(shape), sp)
    target, weight = branch_truth(graph, labels, sp)
    assert graph.n == 1 and target.tolist() == [1.0] and weight.tolist() == [16.0]


def test_a_branch_radius_does_not_depend_on_what_else_widens_the_box():
    """A straight tube 4 x 3 voxels across (0.7 x 0.7 x 1.6 mm): its radius is 1.4 mm whether it
    fills its own bounding box or two far voxels widen it (it was 11 mm alone: the box's faces
    did not count as background)."""
    from inference.branch_graph import FEATURES

    r = FEATURES.index("radius_mm")
    sp = (0.7, 0.7, 1.6)
    tube = np.zeros((40, 40, 20), bool)
    tube[5:35, 18:22, 8:11] = True
    alone = branch_graph(tube, np.zeros(tube.shape), sp)
    wide = tube.copy()
    wide[0, 0, 0] = wide[39, 39, 19] = True
    widened = branch_graph(wide, np.zeros(tube.shape), sp)
    assert alone.n == 1 and alone.features[0, r] == pytest.approx(1.4)
    assert widened.features[:, r].max() == pytest.approx(1.4)
