"""inference/tree_model.py and train_tree_model.py: a coarse 3-D model that tells a vessel mask's
trees apart (issue 26): grids, the loss, learning a worked example, the file, test.py and predict.py."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inference.tree_model import (TreeCase, TreeModel, TreeModelConfig, build_tree_network, coarse, coarse_inputs,
                                  load_tree_model, save_tree_model, shift_zero_fill, train_tree_model, tree_loss)
from inference.trees import TREE_SMOOTHNESS, cut_trees
from utils.h5io import DatasetPaths, read_volume

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(base_channels=4, depth=2, context_mm=4.0, max_shift_voxels=1)


def test_coarse_grid_has_the_size_of_the_field_of_view_in_grid_voxels():
    a = np.ones((60, 40, 30), np.float32)
    assert coarse(a, (1.0, 1.0, 2.0), 2.0).shape == (30, 20, 30)
    assert coarse(a, (0.5, 0.5, 1.0), 2.0).shape == (15, 10, 15)
    # a vessel fraction: the mean of a half-filled volume survives the resampling
    half = np.zeros((40, 40, 40), bool)
    half[:20] = True
    x = coarse_inputs(np.zeros_like(half, np.float32), half, (1.0, 1.0, 1.0), 2.0)
    assert x.shape == (2, 20, 20, 20) and x[1].mean() == pytest.approx(0.5, abs=0.03)


def test_area_rule_keeps_a_thin_vessel_wherever_it_lies():
    """A one-voxel-wide vessel (0.6 mm voxels, 120 mm long: 43.2 mm^3) seen on the 3 mm grid: averaged
    over each coarse voxel its volume stays within 10% of the truth at every sub-voxel position;
    sampled, it vanishes at four positions of five and is a whole coarse voxel wide at the fifth."""
    spacing, grid = (0.6, 0.6, 0.6), 3.0
    volumes = {"area": [], "sample": []}
    for pos in range(30, 35):  # one coarse voxel's width
        a = np.zeros((60, 60, 200), np.float32)
        a[pos, pos, :] = 1.0
        for rule in volumes:
            volumes[rule].append(float(coarse(a, spacing, grid, rule).sum()) * grid ** 3)
    truth = 200 * 0.6 ** 3
    assert all(v == pytest.approx(truth, rel=0.1) for v in volumes["area"])
    assert min(volumes["sample"]) == 0 and max(volumes["sample"]) > 10 * truth  # missed, or 25x too wide
    with pytest.raises(ValueError, match="coarse_rule must be one of"):
        TreeModelConfig(coarse_rule="mean")


def test_shift_moves_without_wrapping_around():
    a = np.arange(2 * 4 * 3 * 5, dtype=np.float32).reshape(2, 4, 3, 5) + 1
    out = shift_zero_fill(a, (-1, 0, 2))
    np.testing.assert_array_equal(out[:, :3, :, 2:], a[:, 1:, :, :3])
    assert not out[:, 3].any() and not out[:, :, :, :2].any()  # nothing came back from the other end
    np.testing.assert_array_equal(shift_zero_fill(a, (0, 0, 0)), a)
    assert not shift_zero_fill(a, (0, 3, 0)).any()


@pytest.mark.parametrize("shape, spacing", [((40, 40, 12), (0.8, 0.8, 1.6)),  # a 19 mm slab of 12 slices
                                            ((16, 16, 16), (0.8, 0.8, 0.8))])  # a tiny scan, a speck
def test_the_default_network_runs_on_a_thin_scan_and_a_tiny_mask(shape, spacing):
    """The default depth-4 U-Net halves each axis four times: a coarse grid of 8 voxels reached 0 and
    one of 16 on every axis left a single voxel for the normalisation; both crashed."""
    cfg = TreeModelConfig()
    torch.manual_seed(0)
    model = TreeModel(build_tree_network(cfg).eval(), cfg)
    union = np.zeros(shape, bool)
    union[8:11, 8:11, 4:8] = True
    image = np.full(shape, 0.3, np.float32)
    logit = model.network_logit(image, union, spacing)
    assert logit.shape == shape and np.isfinite(logit).all() and logit[union].std() >= 0


def test_a_file_from_before_the_coarse_rule_is_read_as_sampled(tmp_path):
    cfg = TreeModelConfig(iterations=1, **TINY)
    model, _ = train_tree_model([two_tree_case(0)], cfg, progress=False)
    path = save_tree_model(tmp_path / "old.pth", model, {})
    doc = torch.load(path, weights_only=False)
    del doc["config"]["coarse_rule"]
    torch.save(doc, path)
    assert load_tree_model(path).config.coarse_rule == "sample"
    assert TreeModelConfig().coarse_rule == "area"


def test_tree_loss_is_the_vessel_weighted_bce_of_the_logit_difference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 3, 3, 2, generator=g)
    target = torch.rand(1, 2, 3, 3, 2, generator=g) / 2
    target[:, :, 0] = 0  # no vessel in these voxels: they must not count
    w = target.sum(1)
    share = target[:, 1] / w.clamp_min(1e-6)
    ref = (F.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], share, reduction="none") * w).sum() / w.sum()
    assert tree_loss(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)
    moved = logits.clone()
    moved[:, :, 0] += 5.0
    assert tree_loss(moved, target).item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="B, 2"):
        tree_loss(logits[:, :1], target[:, :1])


def two_tree_case(seed: int, shape=(40, 40, 24)) -> TreeCase:
    """Two straight tubes along the slices: the portal one in the front rows, the hepatic one at
    the back, at random columns; the image is bright in both (position tells them apart)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    rr, cc = np.mgrid[:shape[0], :shape[1]]
    for value, row in ((1, rng.integers(6, 12)), (2, rng.integers(28, 34))):
        col = rng.integers(10, 30)
        labels[((rr - row) ** 2 + (cc - col) ** 2 <= 9)[..., None].repeat(shape[2], 2)] = value
    image = np.where(labels > 0, 0.8, 0.3).astype(np.float32) + rng.normal(0, 0.02, shape).astype(np.float32)
    return TreeCase(f"case{seed}", image, labels, (1.0, 1.0, 1.0))


def test_a_tree_model_learns_which_tree_a_tube_is_from_where_it_lies():
    cfg = TreeModelConfig(grid_mm=2.0, iterations=120, lr=1e-2, seed=0, **TINY)
    model, losses = train_tree_model([two_tree_case(s) for s in range(4)], cfg, progress=False)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    case = two_tree_case(99)
    labels = model.classify(case.image, case.labels > 0, case.spacing)
    assert np.array_equal(labels > 0, case.labels > 0)  # the mask is kept, only its trees are told
    wrong = np.mean(labels[case.labels > 0] != case.labels[case.labels > 0])
    assert wrong < 0.05
    assert not model.classify(case.image, np.zeros_like(case.labels, bool), case.spacing).any()


def test_the_model_file_round_trips_and_refuses_what_is_not_one(tmp_path):
    cfg = TreeModelConfig(iterations=2, **TINY)
    model, _ = train_tree_model([two_tree_case(0)], cfg, progress=False)
    path = save_tree_model(tmp_path / "t.pth", model, {"cases": ["case0"]})
    back = load_tree_model(path)
    case = two_tree_case(5)
    a = model.hepatic_minus_portal(case.image, case.labels > 0, case.spacing)
    b = back.hepatic_minus_portal(case.image, case.labels > 0, case.spacing)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert back.config == cfg and back.info == {"cases": ["case0"]} and len(back.sha256) == 64
    with pytest.raises(FileExistsError):
        save_tree_model(path, model, {})
    torch.save({"format": "livervessel-checkpoint-v1"}, tmp_path / "vessel.pth")
    with pytest.raises(ValueError, match="vessel.pth: not a tree model"):
        load_tree_model(tmp_path / "vessel.pth")
    # and the other way round: a tree model given where a vessel model belongs is named as one
    from networks.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match="t.pth: not a livervessel-ckpt-v2 checkpoint but a 'livervessel-tree-model-v1' "
                                         "file: a tree model, for --tree_model"):
        load_checkpoint(path)
    from inference.tree_model import FORMAT as TREE_FORMAT
    from networks.checkpoint import OTHER_FORMATS
    assert TREE_FORMAT in OTHER_FORMATS  # the hint follows the tree model's format
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth: not a torch file"):
        load_tree_model(tmp_path / "junk.pth")


def test_train_tree_model_cli_writes_the_model_and_keeps_an_existing_one(tree_data, tmp_path, capsys):
    import train_tree_model

    out = tmp_path / "m" / "tree.pth"
    args = ["--data", str(tree_data / "data"), "phantom", str(tree_data / "list"), "--out", str(out),
            "--iterations", "2", "--base_channels", "4", "--splits", "train,val", "--device", "cpu"]
    assert train_tree_model.main(args) == 0
    assert f"tree model: {out}" in capsys.readouterr().out
    side = json.loads(out.with_suffix(".pth.json").read_text())
    listed = [f"phantom/{c}" for split in ("train", "val")
              for c in (tree_data / "list" / "phantom" / f"vol_{split}.txt").read_text().split()]
    assert side["info"]["cases"] == listed and len(listed) == 2 and len(side["losses"]) == 2
    before = out.read_bytes()
    assert train_tree_model.main(args) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    # data without a class map: one line naming the manifest
    assert train_tree_model.main(["--data", str(tmp_path), "nothing", str(tmp_path), "--out", str(tmp_path / "x.pth")]) == 2
    assert "no dataset manifest" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()


def test_a_case_without_vessels_is_left_out_of_the_training_with_a_warning(tree_data, tmp_path, caplog):
    import shutil

    import train_tree_model
    from utils.h5io import DatasetPaths, read_list, read_volume, write_volume

    shutil.copytree(tree_data / "data", tmp_path / "data")
    shutil.copytree(tree_data / "list", tmp_path / "list")
    paths = DatasetPaths.of(tmp_path / "data", "phantom", tmp_path / "list")
    empty = read_list(paths.list_file("vol_train"))[0]
    vol = read_volume(paths.volume(empty))
    vol.classes[:] = 0
    write_volume(paths.volume(empty), vol)
    with caplog.at_level("WARNING", logger="trees"):
        cases = train_tree_model.read_cases(str(tmp_path / "data"), "phantom", str(tmp_path / "list"), ["train", "val"])
    assert [c.name for c in cases] == [f"phantom/{c}" for c in read_list(paths.list_file("vol_val"))]
    assert f"{empty}.h5: no vessel in its class map" in caplog.text


def everywhere_model(path):
    """A binary vessel model that calls every voxel a vessel (its output bias +60): a mask with
    both trees in it for the tree model to label."""
    from networks.checkpoint import save_checkpoint
    from networks.e2e import build_segmenter

    kwargs = {"base_channels": 4, "depth": 2}
    model = build_segmenter("unet", "none", 1, kwargs)
    out_bias = [k for k, v in model.state_dict().items() if k.endswith("bias") and tuple(v.shape) == (1,)][-1]
    with torch.no_grad():
        model.state_dict()[out_bias].fill_(60.0)
    save_checkpoint(path, model, model_name="unet", model_kwargs=kwargs, salience="none", config={}, out_channels=1,
                    epoch=0, iteration=0, best_metric=0.0, img_size=[32, 32])
    return path


def binary_and_tree_model(tree_data, tmp_path):
    """(the everywhere binary model file, a 2-step tree model file, run_evaluation's data
    arguments for tree_data)."""
    binary = everywhere_model(tmp_path / "everywhere.pth")
    tree, _ = train_tree_model([two_tree_case(0)], TreeModelConfig(iterations=2, **TINY), progress=False)
    tree_file = save_tree_model(tmp_path / "tree.pth", tree, {"cases": ["case0"]})
    data = dict(dataset="phantom", root_path=tree_data / "data", list_dir=tree_data / "list", model_path=binary,
                device="cpu", min_component_mm3=0)
    return binary, tree_file, data


def test_test_py_and_predict_py_label_a_binary_models_mask_with_the_tree_model(tree_data, tmp_path, capsys,
                                                                               monkeypatch):
    import SimpleITK as sitk

    import predict
    from evaluation.runner import run_evaluation

    binary, tree_file, data = binary_and_tree_model(tree_data, tmp_path)
    res = run_evaluation(**data, output=tmp_path / "eval", tree_model=tree_file, tree_smoothness=0.0)
    plain = run_evaluation(**data, output=tmp_path / "eval_plain")
    row, ref = res.rows[0], plain.rows[0]
    # the union is the binary model's mask, scored as before; the trees split it
    assert row["dice"] == pytest.approx(ref["dice"]) and row["voxels_pred"] == ref["voxels_pred"]
    assert row["voxels_pred"] == row["portal_voxels_pred"] + row["hepatic_voxels_pred"]
    assert row["voxels_pred"] > 0 and row["portal_voxels_pred"] > 0 and row["hepatic_voxels_pred"] > 0
    assert 0.0 <= row["wrong_tree_share"] <= 1.0 and row["wrong_tree_share"] == row["wrong_tree_share_voxelwise"]
    meta = json.loads((tmp_path / "eval" / "summary.json").read_text())["meta"]
    assert meta["tree_model"]["sha256"] == load_tree_model(tree_file).sha256
    assert meta["tree_model"]["smoothness"] == 0.0
    # the report names its trees and shows their scores in a second table (results.md and the console)
    assert res.classes == meta["classes"] == ["portal", "hepatic"] and plain.classes is None
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "**Per tree**" in md and "| portal Dice | portal clDice | hepatic Dice |" in md
    assert f"{row['portal_dice']:.4f}" in md.split("**Per tree**")[1] and f"{row['wrong_tree_share']:.1%}" in md
    import test as test_py
    assert test_py.main(["--dataset", "phantom", "--root_path", str(tree_data / "data"), "--list_dir",
                         str(tree_data / "list"), "--model_path", str(binary), "--device", "cpu",
                         "--min_component_mm3", "0", "--output", str(tmp_path / "eval"), "--tree_model",
                         str(tree_file), "--tree_smoothness", "0"]) == 0
    out = capsys.readouterr().out  # the report is kept and its trees printed again
    assert "per tree" in out and "wrong tree" in out and f"{row['hepatic_dice']:.4f}" in out

    # the default: the labels written are the minimum cut of the tree model's logit on the binary mask,
    # and the voxel-by-voxel share is that of smoothness 0
    cut = run_evaluation(**data, output=tmp_path / "eval_cut", tree_model=tree_file, save_pred="h5", pred_kind="mask")
    assert cut.rows[0]["wrong_tree_share_voxelwise"] == row["wrong_tree_share"]
    case = cut.rows[0]["case"]
    vol = read_volume(DatasetPaths.of(tree_data / "data", "phantom", tree_data / "list").volume(case))
    with h5py.File(tmp_path / "eval_cut" / "predictions" / f"{case}_pred.h5", "r") as f:
        written = f["mask"][:]
    model = load_tree_model(tree_file)
    union = written > 0
    assert union.sum() == row["voxels_pred"]
    logit = model.hepatic_minus_portal(vol.image, union, vol.spacing)
    expected = cut_trees(union, logit, vol.spacing, TREE_SMOOTHNESS)
    assert not np.array_equal(expected, cut_trees(union, logit, vol.spacing, 0.0))  # the cut changes labels here
    assert np.array_equal(written, expected)
    assert cut.rows[0]["portal_voxels_pred"] == (expected == 1).sum()
    assert json.loads((tmp_path / "eval_cut" / "summary.json").read_text())["meta"]["tree_model"]["smoothness"] == \
        TREE_SMOOTHNESS

    import evaluation.graph

    seen_labels = []
    real_graph = evaluation.graph.vessel_graph

    def spy(mask, spacing, labels=None, **kw):
        seen_labels.extend([labels, mask])
        return real_graph(mask, spacing, labels=labels, **kw)

    monkeypatch.setattr(evaluation.graph, "vessel_graph", spy)
    out = tmp_path / "out"
    rc = predict.main(["--model", str(binary), "--input", str(tree_data / "raw" / "3Dircadb1.1"), "--output", str(out),
                       "--device", "cpu", "--mesh", "--tree_model", str(tree_file), "--min_component_mm3", "0",
                       "--prob", "--graph"])
    assert rc == 0, capsys.readouterr().err
    case = "3Dircadb1.1"
    trees = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_trees.nii.gz")))
    vessels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_vessels.nii.gz")))
    assert set(np.unique(trees)) <= {0, 1, 2} and np.array_equal(trees > 0, vessels > 0)
    # the binary model's probabilities, in the scan's geometry, also with a tree model
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_prob.nii.gz")))
    assert prob.shape == vessels.shape and 0 <= prob.min() and prob.max() <= 1
    # the branch graph was given the label map, for each branch's tree (this blob's skeleton is
    # too plain for branches: evaluation.graph's tests check the trees on tubes)
    assert (out / f"{case}_graph.graphml").is_file() and np.array_equal(seen_labels[0] > 0, seen_labels[1])
    for name in ("_portal.stl", "_hepatic.stl"):
        assert (out / f"{case}{name}").is_file()
    stats = json.loads((out / f"{case}_stats.json").read_text())
    assert stats["tree_model"]["sha256"] == load_tree_model(tree_file).sha256
    assert stats["tree_model"]["smoothness"] == TREE_SMOOTHNESS
    assert stats["stats"]["trees_label_values"] == {"portal": 1, "hepatic": 2}
    # another smoothness is another result: the outputs are made again, not kept
    rc = predict.main(["--model", str(binary), "--input", str(tree_data / "raw" / "3Dircadb1.1"), "--output", str(out),
                       "--device", "cpu", "--mesh", "--tree_model", str(tree_file), "--min_component_mm3", "0",
                       "--tree_smoothness", "0"])
    assert rc == 0
    assert json.loads((out / f"{case}_stats.json").read_text())["tree_model"]["smoothness"] == 0.0


def test_a_tree_model_with_a_model_of_classes_is_refused_in_one_line(tree_data, tmp_path, capsys):
    import predict
    from networks.checkpoint import save_checkpoint
    from networks.e2e import build_segmenter

    kwargs = {"base_channels": 4, "depth": 2}
    two = tmp_path / "two.pth"
    save_checkpoint(two, build_segmenter("unet", "none", 2, kwargs), model_name="unet", model_kwargs=kwargs,
                    salience="none", config={"classes": ["portal", "hepatic"]}, out_channels=2, epoch=0,
                    iteration=0, best_metric=0.0, img_size=[32, 32])
    tree, _ = train_tree_model([two_tree_case(0)], TreeModelConfig(iterations=1, **TINY), progress=False)
    tree_file = save_tree_model(tmp_path / "tree.pth", tree, {})
    out = tmp_path / "out"
    rc = predict.main(["--model", str(two), "--input", str(tree_data / "raw" / "3Dircadb1.1"), "--output", str(out),
                       "--device", "cpu", "--tree_model", str(tree_file)])
    err = capsys.readouterr().err
    assert rc == 1 and "already has the classes ['portal', 'hepatic']" in err and not out.exists()


def test_the_cli_defaults_are_the_configs():
    # train_tree_model.py keeps torch out of --help, so its defaults are written out: they must
    # stay those of TreeModelConfig, which a model trained from Python gets
    from dataclasses import fields

    from train_tree_model import build_parser

    args = vars(build_parser().parse_args(["--data", "r", "d", "l", "--out", "x"]))
    cfg = TreeModelConfig()
    shared = [f.name for f in fields(cfg) if f.name in args]
    assert {"grid_mm", "iterations", "context_mm", "base_channels", "lr", "seed", "coarse_rule"} <= set(shared)
    for name in shared:
        assert args[name] == getattr(cfg, name), name
    from inference.tree_model import COARSE_RULES

    rule = next(a for a in build_parser()._actions if a.dest == "coarse_rule")
    assert tuple(rule.choices) == COARSE_RULES


def test_tree_smoothness_is_refused_without_a_tree_model_or_below_zero(tree_data, tmp_path, capsys):
    import predict
    import test as test_py

    binary = everywhere_model(tmp_path / "everywhere.pth")
    scan = str(tree_data / "raw" / "3Dircadb1.1")
    for main, args in ((predict.main, ["--model", str(binary), "--input", scan, "--output", str(tmp_path / "o")]),
                       (test_py.main, ["--dataset", "phantom", "--root_path", str(tree_data / "data"),
                                       "--list_dir", str(tree_data / "list"), "--model_path", str(binary)])):
        with pytest.raises(SystemExit) as e:
            main(args + ["--tree_smoothness", "4"])
        assert e.value.code == 2 and "give --tree_model" in capsys.readouterr().err
    tree, _ = train_tree_model([two_tree_case(0)], TreeModelConfig(iterations=1, **TINY), progress=False)
    tree_file = str(save_tree_model(tmp_path / "tree.pth", tree, {}))
    rc = predict.main(["--model", str(binary), "--input", scan, "--output", str(tmp_path / "o"), "--device", "cpu",
                       "--tree_model", tree_file, "--tree_smoothness", "-1"])
    err = capsys.readouterr().err
    assert rc == 1 and "tree smoothness must be a number >= 0, got -1" in err and not (tmp_path / "o").exists()
    rc = test_py.main(["--dataset", "phantom", "--root_path", str(tree_data / "data"), "--list_dir",
                       str(tree_data / "list"), "--model_path", str(binary), "--device", "cpu", "--tree_model",
                       tree_file, "--tree_smoothness", "nan", "--output", str(tmp_path / "eval")])
    assert rc == 1 and "tree smoothness must be a number >= 0, got nan" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_draw_tree_cut_paints_each_tree_where_it_projects(tree_data, tmp_path):
    from evaluation.runner import run_evaluation
    from scripts.draw_tree_cut import coronal_rgb, draw_tree_cut

    # the worked example: a flat image, portal in one column of slice 0, hepatic behind it further down
    image = np.zeros((4, 5, 3), np.float32)
    labels = np.zeros((4, 5, 3), np.uint8)
    labels[1, 2, 0] = 1
    labels[3, 4, 2] = 2
    rgb = coronal_rgb(image, labels, {1: (1.0, 0.0, 0.0), 2: (0.0, 0.0, 1.0)})
    assert rgb.shape == (3, 5, 3)
    # slice 0 at the bottom (the slice axis reversed), column 2: red; slice 2 at the top, column 4: blue
    assert np.allclose(rgb[2, 2], [0.75, 0, 0]) and np.allclose(rgb[0, 4], [0, 0, 0.75])
    assert np.count_nonzero(rgb.sum(axis=2)) == 2

    binary = everywhere_model(tmp_path / "everywhere.pth")
    tree, _ = train_tree_model([two_tree_case(0)], TreeModelConfig(iterations=2, **TINY), progress=False)
    tree_file = save_tree_model(tmp_path / "tree.pth", tree, {})
    data = dict(dataset="phantom", root_path=tree_data / "data", list_dir=tree_data / "list", model_path=binary,
                device="cpu", min_component_mm3=0)
    res = run_evaluation(**data, output=tmp_path / "eval", tree_model=tree_file, save_pred="h5", pred_kind="mask")
    case = res.rows[0]["case"]
    out = draw_tree_cut(tmp_path / "eval", str(tree_data / "data"), "phantom", str(tree_data / "list"), case,
                        tmp_path / "cut.png")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = run_evaluation(**data, output=tmp_path / "plain", save_pred="h5", pred_kind="mask")
    with pytest.raises(ValueError, match="not a report of a tree model"):
        draw_tree_cut(plain.output, str(tree_data / "data"), "phantom", str(tree_data / "list"), case,
                      tmp_path / "no.png")
    assert not (tmp_path / "no.png").exists()
    # with branch networks in the file: the tree model alone and the networks' labels, before the cut
    from inference.branch_graph import BranchConfig, BranchModel, BranchNet, FEATURES, branch_graph
    from scripts.draw_tree_cut import uncut_labels

    c = two_tree_case(0)
    union = c.labels > 0
    (name, alone), = uncut_labels(tree, c.image, union, c.spacing)
    assert name == "tree model, voxel by voxel"
    logit = tree.network_logit(c.image, union, c.spacing)
    assert np.array_equal(alone, np.where(union, np.where(logit > 0, 2, 1), 0))
    # a network that calls every branch the other tree than most of the tree model's voxels
    net = BranchNet(8, 1, 0.0).eval()
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.fill_(5.0 if (alone[union] == 1).mean() > 0.5 else -5.0)
    cfg = BranchConfig(hidden=8, layers=1, dropout=0.0, seeds=(0,))
    tree.branches = BranchModel([net], np.zeros(len(FEATURES), np.float32), np.ones(len(FEATURES), np.float32), cfg)
    (n1, first), (n2, per_branch) = uncut_labels(tree, c.image, union, c.spacing)
    assert (n1, n2) == ("tree model alone, voxel by voxel", "branch networks, branch by branch")
    assert np.array_equal(first, alone) and (first[union] != per_branch[union]).mean() > 0.5
    graph = branch_graph(union, logit, c.spacing)
    hepatic = np.concatenate([[False], tree.branches.logits(graph) > 0])[graph.piece]
    expected = np.zeros(union.shape, np.uint8)
    expected[graph.box] = np.where(graph.piece > 0, np.where(hepatic, 2, 1), 0)
    assert np.array_equal(per_branch, expected)
    out = draw_tree_cut(tmp_path / "eval", str(tree_data / "data"), "phantom", str(tree_data / "list"), case,
                        tmp_path / "cut4.png", tree_model=tree)
    assert out.is_file()


def test_test_py_warns_when_the_tree_model_learnt_from_the_test_cases(tree_data, tmp_path, caplog):
    from evaluation.runner import run_evaluation
    from utils.h5io import read_list

    binary, _, data = binary_and_tree_model(tree_data, tmp_path)
    test_case = read_list(DatasetPaths.of(tree_data / "data", "phantom", tree_data / "list").list_file("vol_test"))[0]
    tree, _ = train_tree_model([two_tree_case(0)], TreeModelConfig(iterations=1, **TINY), progress=False)
    here = [str(tree_data / "data"), "phantom", str(tree_data / "list")]
    elsewhere = [str(tmp_path / "other_root"), "phantom", str(tree_data / "list")]  # same dataset name, other data
    for name, cases, data_of in (("held_out", ["phantom/case9999", f"other/{test_case}"], [here]),
                                 ("namesake", [f"phantom/{test_case}"], [elsewhere]),
                                 ("seen", [f"phantom/{test_case}"], [elsewhere, here])):
        caplog.clear()
        with caplog.at_level("WARNING"):
            run_evaluation(**data, output=tmp_path / name, tree_model=save_tree_model(
                tmp_path / f"{name}.pth", tree, {"cases": cases, "data": data_of}))
        warned = [r.getMessage() for r in caplog.records if "not a held-out score" in r.getMessage()]
        assert len(warned) == (name == "seen"), name
    assert f"trained on 1 of these test cases (phantom/{test_case})" in warned[0]


def test_a_tree_model_file_with_the_trees_in_another_order_is_refused(tmp_path):
    tree, _ = train_tree_model([two_tree_case(0)], TreeModelConfig(iterations=1, **TINY), progress=False)
    path = save_tree_model(tmp_path / "t.pth", tree, {})
    doc = torch.load(path, weights_only=False)
    doc["classes"] = ["hepatic", "portal"]
    torch.save(doc, path)
    with pytest.raises(ValueError, match=r"t.pth: labels the trees \['hepatic', 'portal'\]"):
        load_tree_model(path)


def test_branch_networks_of_another_vessel_model_are_warned_about(tmp_path):
    from inference.branch_graph import FEATURES, BranchConfig, BranchModel, BranchNet
    from inference.tree_model import vessel_model_warning

    tree, _ = train_tree_model([two_tree_case(0)], TreeModelConfig(iterations=1, **TINY), progress=False)
    assert vessel_model_warning(tree, "a" * 64, {}) is None  # no branch networks
    cfg = BranchConfig(hidden=4, layers=1, seeds=(0,))
    tree.branches = BranchModel([BranchNet(4, 1, 0.0)], np.zeros(len(FEATURES), np.float32),
                                np.ones(len(FEATURES), np.float32), cfg)
    tree.path = "t.pth"
    tree.info = {"branches": {"vessel_model_sha256": ["b" * 64]}}
    assert vessel_model_warning(tree, "b" * 64, {}) is None
    w = vessel_model_warning(tree, "a" * 64, {})
    assert w is not None and w.startswith("t.pth: its branch networks learnt the masks of vessel model(s) bbbbbbbbbbbb")
    # a file with an embedded liver model names the vessel model it was made from
    assert vessel_model_warning(tree, "c" * 64, {"vessel_model_sha256": "b" * 64}) is None
    tree.info = {"branches": {"vessel_model_sha256": [""]}}  # masks without a report: unknown
    assert vessel_model_warning(tree, "a" * 64, {}) is None
