"""Two vessel trees (issue 26, point 2): label maps, consistent pieces, class targets, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloaders.datasets import SliceDataSet, label_target
from dataloaders.transforms import rot_flip
from inference.predictor import Predictor
from inference.trees import TREE_SMOOTHNESS, consistent_trees, cut_trees, tree_labels
from trainer import TrainConfig, train
from utils.h5io import DatasetPaths, read_volume
from utils.manifests import class_labels, class_values, dataset_class_values

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tree_labels_take_the_most_probable_class_inside_the_union():
    prob = np.zeros((2, 4, 4, 1), np.float32)
    prob[0, 0, 0] = 0.9                      # portal only
    prob[1, 1, 1] = 0.7                      # hepatic only
    prob[:, 2, 2] = [[0.6], [0.8]]           # both above: the larger wins
    prob[:, 3, 3] = [[0.4], [0.45]]          # neither reaches 0.5: background, like a binary model
    lab = tree_labels(prob, (1, 1, 1))
    expected = np.zeros((4, 4, 1), np.uint8)
    expected[0, 0], expected[1, 1], expected[2, 2] = 1, 2, 2
    assert np.array_equal(lab, expected)
    roi = np.ones((4, 4, 1), bool)
    roi[0, 0] = False
    assert tree_labels(prob, (1, 1, 1), roi=roi)[0, 0, 0] == 0
    with pytest.raises(ValueError, match="K, H, W, D"):
        tree_labels(prob[0], (1, 1, 1))


def tube_along_d(shape, r0, c0, radius=1.5) -> np.ndarray:
    r, c = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    disk = (r - r0) ** 2 + (c - c0) ** 2 <= radius ** 2
    return np.repeat(disk[:, :, None], shape[2], axis=2)


def test_consistent_trees_fix_stretches_given_the_other_tree_and_keep_touching_trees_apart():
    shape = (20, 30, 40)
    portal, hepatic = tube_along_d(shape, 5, 6), tube_along_d(shape, 14, 22)
    lab = np.zeros(shape, np.uint8)
    lab[portal], lab[hepatic] = 1, 2
    swapped = lab.copy()
    swapped[:, :, 10:14][portal[:, :, 10:14]] = 2   # a stretch of the portal vein called hepatic (10 %)
    swapped[:, :, 30:33][hepatic[:, :, 30:33]] = 1
    assert np.array_equal(consistent_trees(swapped), lab)

    # two trees that touch: a portal tube (30 slices) joined end to end to a hepatic tube (10),
    # each with a short stray stretch of the other label; no class is 80% of the piece
    joined = np.zeros(shape, np.uint8)
    t = tube_along_d(shape, 10, 15)
    joined[t & (np.arange(40) < 24)] = 1
    joined[t & (np.arange(40) >= 24)] = 2
    noisy = joined.copy()
    noisy[t & (np.arange(40) >= 5) & (np.arange(40) < 7)] = 2   # hepatic inside the portal stretch
    noisy[t & (np.arange(40) >= 33) & (np.arange(40) < 35)] = 1  # portal inside the hepatic stretch
    assert np.array_equal(consistent_trees(noisy), joined)
    assert np.array_equal(consistent_trees(noisy) > 0, noisy > 0)  # the union never changes


def two_touching_tubes() -> tuple[np.ndarray, np.ndarray]:
    """A portal tube along rows (column 12, slices 1-5) and a hepatic tube along columns (row 20,
    slices 6-10), radius 2 voxels, crossing one above the other: they touch only where they cross,
    through 26-neighbours between slices 5 and 6. Returns the true label map and a tree-model-like
    logit: -3 on the portal tube, +3 on the hepatic one, but +1 on the portal tube within 6 rows of
    the crossing (a 3 mm grid smears the hepatic tube's decision over its neighbour)."""
    r, c, z = np.meshgrid(np.arange(40), np.arange(40), np.arange(12), indexing="ij")
    portal = (c - 12) ** 2 + (z - 3) ** 2 <= 4
    hepatic = (r - 20) ** 2 + (z - 8) ** 2 <= 4
    truth = np.where(portal, 1, np.where(hepatic, 2, 0)).astype(np.uint8)
    logit = np.where(portal, -3.0, 3.0)
    logit[portal & (np.abs(r - 20) <= 6)] = 1.0
    return truth, logit


def test_cut_trees_moves_a_smeared_decision_to_where_the_tubes_touch():
    truth, logit = two_touching_tubes()
    union = truth > 0
    assert not (truth == 1)[:, :, 6:].any() and not (truth == 2)[:, :, :6].any()  # the tubes only touch
    voxelwise = cut_trees(union, logit, (1.0, 1.0, 1.0), 0.0)
    # voxel by voxel, the smeared stretch of the portal tube (13 rows of its 13-voxel section) is hepatic
    assert np.array_equal(voxelwise, np.where(union, np.where(logit > 0, 2, 1), 0))
    assert ((voxelwise == 2) & (truth == 1)).sum() == 13 * 13
    # the cut: the touching place costs 8 / d for each of its few 26-neighbour pairs; cutting the portal
    # tube twice across its section costs far more than the 1 nat per voxel of keeping the stretch portal
    assert np.array_equal(cut_trees(union, logit, (1.0, 1.0, 1.0), TREE_SMOOTHNESS), truth)


@pytest.mark.parametrize("rows, strength, one_tree", [(10, 1.0, True), (40, 4.0, False)])
def test_cut_trees_gives_a_stretch_one_tree_unless_its_evidence_outweighs_a_cut(rows, strength, one_tree):
    # one tube along rows (section 13 voxels) whose first `rows` rows say hepatic. Keeping them hepatic
    # costs one cut across the section, at most 13 * (1 + 4 / sqrt 2 + 4 / sqrt 3) x 8 = 640 (fewer pairs
    # at the tube's wall); flipping them costs `strength` nats per voxel: 10 x 13 x 1 = 130 (flipped),
    # 40 x 13 x 4 = 2080 (kept)
    r, c, z = np.meshgrid(np.arange(60), np.arange(9), np.arange(9), indexing="ij")
    tube = (c - 4) ** 2 + (z - 4) ** 2 <= 4
    assert tube[0].sum() == 13
    logit = np.where(r < rows, strength, -strength).astype(np.float32)
    labels = cut_trees(tube, logit, (1.0, 1.0, 1.0))
    if one_tree:
        assert np.array_equal(labels, np.where(tube, 1, 0))
    else:
        assert np.array_equal(labels, np.where(tube, np.where(r < rows, 2, 1), 0))


def test_cut_trees_with_extreme_values_keeps_to_the_solver_s_integer_range():
    # capacities past int32 make scipy's max flow silently zero, which reads as "all portal"
    r, c, z = np.meshgrid(np.arange(60), np.arange(9), np.arange(9), indexing="ij")
    tube = (c - 4) ** 2 + (z - 4) ** 2 <= 4
    logit = np.where(r < 36, 1.0, -1.0)  # 60% of the tube says hepatic
    # an enormous smoothness: one connected tube takes one tree, the one with the lower total loss
    assert np.array_equal(cut_trees(tube, logit, (1.0, 1.0, 1.0), 1e12), np.where(tube, 2, 0))
    # enormous logits: as sure as their sign, whatever the smoothness
    sure = np.where(r < 30, 1e9, -1e9)
    assert np.array_equal(cut_trees(tube, sure, (1.0, 1.0, 1.0), 0.5), np.where(tube, np.where(r < 30, 2, 1), 0))


def cut_energy(labels: np.ndarray, union: np.ndarray, logit: np.ndarray, spacing, smoothness: float) -> float:
    """The energy cut_trees minimises, written out: logistic losses plus smoothness / d per pair of
    26-neighbours of the mask labelled apart."""
    a = logit[union]
    hep = labels[union] == 2
    energy = float(np.where(hep, np.logaddexp(0, -a), np.logaddexp(0, a)).sum())
    pts = np.argwhere(union)
    for i in range(len(pts)):
        for j in range(i + 1, len(pts)):
            step = pts[j] - pts[i]
            if np.abs(step).max() == 1 and labels[tuple(pts[i])] != labels[tuple(pts[j])]:
                energy += smoothness / float(np.linalg.norm(step * np.asarray(spacing)))
    return energy


@pytest.mark.parametrize("seed", range(4))
def test_cut_trees_finds_the_least_energy_of_all_labellings(seed):
    # 10 voxels: all 1024 labellings tried by hand
    import itertools

    rng = np.random.default_rng(seed)
    union = np.zeros((3, 3, 3), bool)
    union.ravel()[rng.choice(27, 10, replace=False)] = True
    logit = rng.normal(0.0, 2.0, union.shape)
    spacing, smoothness = (0.8, 0.8, 1.6), float(rng.uniform(0.5, 3.0))
    best = np.inf
    for bits in itertools.product((1, 2), repeat=10):
        lab = np.zeros(union.shape, np.uint8)
        lab[union] = bits
        best = min(best, cut_energy(lab, union, logit, spacing, smoothness))
    got = cut_trees(union, logit, spacing, smoothness)
    assert set(np.unique(got[union])) <= {1, 2} and not got[~union].any()
    # costs are rounded to 1/100 nat: within that of the optimum over at most 10 + 45 terms
    assert cut_energy(got, union, logit, spacing, smoothness) <= best + 0.3


def test_cut_trees_breaks_ties_to_portal_as_the_sign_does():
    union = np.zeros((1, 4, 1), bool)
    union[0, :, 0] = True
    logit = np.zeros(union.shape)  # no evidence either way: every labelling of one tree costs the same
    assert np.array_equal(cut_trees(union, logit, (1, 1, 1), 0.0), cut_trees(union, logit, (1, 1, 1), 5.0))
    assert (cut_trees(union, logit, (1, 1, 1), 5.0)[union] == 1).all()


def test_cut_trees_at_zero_smoothness_is_the_sign_and_refuses_bad_input():
    rng = np.random.default_rng(0)
    union = rng.random((12, 10, 8)) < 0.4
    logit = rng.normal(size=union.shape)
    expected = np.where(union, np.where(logit > 0, 2, 1), 0)
    assert np.array_equal(cut_trees(union, logit, (0.7, 0.7, 1.6), 0.0), expected)
    assert not cut_trees(np.zeros_like(union), logit, (1, 1, 1)).any()
    with pytest.raises(ValueError, match="alike"):
        cut_trees(union, logit[:-1], (1, 1, 1))
    with pytest.raises(ValueError, match="smoothness"):
        cut_trees(union, logit, (1, 1, 1), -1.0)
    with pytest.raises(ValueError, match="spacing"):
        cut_trees(union, logit, (1, 0, 1))
    bad = logit.copy()
    bad[union] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        cut_trees(union, bad, (1, 1, 1))


def test_class_targets_and_rot_flip_keep_channels_aligned():
    rng = np.random.default_rng(0)
    cmap = rng.integers(0, 3, (6, 6)).astype(np.uint8)
    target = label_target(cmap, (1, 2))
    assert target.shape == (2, 6, 6)
    assert np.array_equal(target[0], cmap == 1) and np.array_equal(target[1], cmap == 2)
    assert np.array_equal(label_target(cmap, None), (cmap > 0).astype(np.float32))
    image = rng.random((6, 6)).astype(np.float32)
    for seed in range(8):
        im2, lab2, _ = rot_flip(image, target, None, np.random.default_rng(seed))
        im1, lab1, _ = rot_flip(image, target[1], None, np.random.default_rng(seed))
        assert np.array_equal(im1, im2) and np.array_equal(lab2[1], lab1)


def test_class_values_resolve_names_against_the_class_map(tmp_path):
    doc = {"class_map": {"classes": ["portalvein", "venoussystem"]}}
    assert class_values(["portal", "hepatic"], doc, "d.json") == [1, 2]
    assert class_values(["hepatic", "portal"], doc, "d.json") == [2, 1]
    with pytest.raises(ValueError, match="d.json: class 'artery' is not in the class map"):
        class_values(["portal", "artery"], doc, "d.json")
    with pytest.raises(ValueError, match="d.json: no class map"):
        class_values(["portal", "hepatic"], {"class_map": None}, "d.json")


def test_class_labels_follow_the_order_asked_for_and_dataset_class_values_reads_the_manifest(tree_data, tmp_path):
    stored = np.array([[0, 1], [2, 3]])
    assert np.array_equal(class_labels(stored, [1, 2]), [[0, 1], [2, 0]])
    assert np.array_equal(class_labels(stored, [2, 1]), [[0, 2], [1, 0]])  # hepatic stored first
    assert dataset_class_values(["portal", "hepatic"], DatasetPaths.of(tree_data / "data", "phantom",
                                                                       tree_data / "list")) == [1, 2]
    with pytest.raises(ValueError, match="no dataset manifest"):
        dataset_class_values(["portal"], DatasetPaths.of(tmp_path, "none", tmp_path))


@pytest.mark.parametrize("backbone,salience", [("unet", "none"), ("unet", "e2e"), ("unet3d", "none")])
def test_training_with_classes_gives_one_output_per_tree(tree_data, tmp_path, backbone, salience):
    kw = {"base_channels": 4, "depth": 2}
    cfg = TrainConfig(dataset="phantom", root_path=str(tree_data / "data"), list_dir=str(tree_data / "list"),
                      output_root=str(tmp_path / "ckpt"), backbone=backbone, model_kwargs=kw, salience=salience,
                      img_size=(32, 32), patch_size=(16, 16, 8), patches_per_epoch=4, batch_size=2, num_workers=0,
                      max_iterations=2, classes=["portal", "hepatic"], seed=0)
    train(cfg)
    pred = Predictor.from_checkpoint(cfg.run_dir() / "best_model.pth", "cpu")
    assert pred.classes == ["portal", "hepatic"] and pred.ckpt["out_channels"] == 2
    paths = DatasetPaths.of(tree_data / "data", "phantom", tree_data / "list")
    vol = read_volume(paths.volume("case0001"))
    prob = pred.probabilities(vol.image, vol.spacing)
    assert prob.shape == (2,) + vol.image.shape
    labels = pred.labels(prob, vol.spacing)
    assert set(np.unique(labels)) <= {0, 1, 2}
    # the union is the binary rule on the largest class probability
    assert np.array_equal(pred.mask(prob, vol.spacing), prob.max(axis=0) >= 0.5)


def test_binary_training_on_data_with_a_class_map_stays_binary(tree_data, tmp_path):
    paths = DatasetPaths.of(tree_data / "data", "phantom", tree_data / "list")
    ds = SliceDataSet(paths, "none", img_size=(32, 32), augment=False)
    two = SliceDataSet(paths, "none", img_size=(32, 32), augment=False, classes=(1, 2))
    for i in range(0, len(ds), 7):
        a, b = ds[i]["label"], two[i]["label"]
        assert a.shape == (1, 32, 32) and b.shape == (2, 32, 32)
        # the binary label is the union of the two trees' targets (resized the same way)
        assert torch.allclose(a[0], (b[0] + b[1]).clamp(max=1), atol=1e-5)


def test_wrong_tree_share_worked_example():
    from evaluation.metrics import wrong_tree_share

    true = np.array([1, 1, 1, 1, 2, 2, 0, 0])[:, None, None]
    pred = np.array([1, 1, 2, 0, 2, 1, 1, 0])[:, None, None]
    # found: positions 0, 1, 2, 4, 5 (5 voxels); given the other tree: 2 and 5
    assert wrong_tree_share(pred, true) == pytest.approx(2 / 5)
    roi = np.ones_like(true, bool)
    roi[5] = False
    assert wrong_tree_share(pred, true, roi) == pytest.approx(1 / 4)
    assert np.isnan(wrong_tree_share(np.zeros_like(true), true))


def test_test_py_reports_every_metric_per_tree_and_the_union(tree_data, tmp_path):
    from evaluation.runner import run_evaluation
    from evaluation.metrics import METRIC_KEYS

    cfg = TrainConfig(dataset="phantom", root_path=str(tree_data / "data"), list_dir=str(tree_data / "list"),
                      output_root=str(tmp_path / "ckpt"), model_kwargs={"base_channels": 4, "depth": 2},
                      salience="none", img_size=(32, 32), batch_size=2, num_workers=0, max_iterations=2,
                      classes=["portal", "hepatic"], seed=0)
    train(cfg)
    res = run_evaluation(dataset="phantom", root_path=tree_data / "data", list_dir=tree_data / "list",
                         model_path=cfg.run_dir() / "best_model.pth", device="cpu", output=tmp_path / "eval",
                         save_pred="h5", pred_kind="mask")
    row = res.rows[0]
    for c in ("portal", "hepatic"):
        assert all(f"{c}_{k}" in row for k in METRIC_KEYS)
    # the union's voxels are the two trees' voxels; the truth's likewise
    assert row["voxels_pred"] == row["portal_voxels_pred"] + row["hepatic_voxels_pred"]
    assert row["voxels_true"] == row["portal_voxels_true"] + row["hepatic_voxels_true"]
    assert "wrong_tree_share" in res.summary and "wrong_tree_share_voxelwise" in res.summary
    import h5py

    with h5py.File(tmp_path / "eval" / "predictions" / f"{row['case']}_pred.h5", "r") as f:
        saved = f["mask"][()]
    assert set(np.unique(saved)) <= {0, 1, 2} and int((saved > 0).sum()) == row["voxels_pred"]


def test_test_py_reads_the_trees_from_the_test_datas_own_class_map(tree_data, tmp_path):
    """Test data whose class map lists the trees the other way round (1 hepatic, 2 portal) is scored
    against the same trees."""
    from evaluation.runner import run_evaluation
    from preprocessing.pipeline import preprocess

    assert preprocess("phantom", tree_data / "raw", tmp_path / "rev", tmp_path / "rev_list",
                      vessel_classes=("venoussystem", "portalvein"), split=(0.34, 0.33, 0.33)).ok
    cfg = TrainConfig(dataset="phantom", root_path=str(tree_data / "data"), list_dir=str(tree_data / "list"),
                      output_root=str(tmp_path / "ckpt"), model_kwargs={"base_channels": 4, "depth": 2},
                      salience="none", img_size=(32, 32), batch_size=2, num_workers=0, max_iterations=1,
                      classes=["portal", "hepatic"], seed=0)
    train(cfg)
    model = cfg.run_dir() / "best_model.pth"
    rows = [run_evaluation(dataset="phantom", root_path=root, list_dir=lists, model_path=model, device="cpu",
                           output=tmp_path / f"eval{k}").rows[0]
            for k, (root, lists) in enumerate(((tree_data / "data", tree_data / "list"),
                                               (tmp_path / "rev", tmp_path / "rev_list")))]
    assert rows[0]["case"] == rows[1]["case"]
    assert rows[0]["portal_voxels_true"] != rows[0]["hepatic_voxels_true"]  # so that a swap would show
    for c in ("portal", "hepatic"):
        assert rows[1][f"{c}_voxels_true"] == rows[0][f"{c}_voxels_true"]
    # test data without its dataset.json: the class map the model learnt from, with a warning
    import shutil

    shutil.copytree(tree_data / "data", tmp_path / "old")
    next((tmp_path / "old").rglob("dataset.json")).unlink()
    old = run_evaluation(dataset="phantom", root_path=tmp_path / "old", list_dir=tree_data / "list", model_path=model,
                         device="cpu", output=tmp_path / "eval_old").rows[0]
    assert old["portal_voxels_true"] == rows[0]["portal_voxels_true"]


def test_test_py_names_a_two_tree_model_that_predicts_nothing(tree_data, tmp_path, caplog):
    """A collapsed class model (every output far below the threshold) scored inside the liver:
    the warning reads the largest class probability, (K, H, W, D) reduced to (H, W, D)."""
    from evaluation.runner import run_evaluation
    from networks.checkpoint import save_checkpoint
    from networks.e2e import build_segmenter

    kwargs = {"base_channels": 4, "depth": 2}
    model = build_segmenter("unet", "none", 2, kwargs)
    out_bias = [k for k, v in model.state_dict().items() if k.endswith("bias") and tuple(v.shape) == (2,)][-1]
    with torch.no_grad():
        model.state_dict()[out_bias].fill_(-60.0)
    ckpt = tmp_path / "silent.pth"
    save_checkpoint(ckpt, model, model_name="unet", model_kwargs=kwargs, salience="none",
                    config={"classes": ["portal", "hepatic"]}, out_channels=2, epoch=0, iteration=0,
                    best_metric=0.0, img_size=[32, 32])
    with caplog.at_level("WARNING", logger="test"):
        res = run_evaluation(dataset="phantom", root_path=tree_data / "data", list_dir=tree_data / "list",
                             model_path=ckpt, device="cpu", output=tmp_path / "eval", eval_roi="liver")
    assert all(r["empty_pred"] and not r["empty_true"] for r in res.rows)
    assert len([m for m in caplog.messages if "predicts no vessel (highest probability 0.000" in m]) == len(res.rows)


def test_predict_writes_a_label_map_a_mesh_and_statistics_per_tree(tree_data, tmp_path, capsys):
    import json

    import SimpleITK as sitk

    import predict

    cfg = TrainConfig(dataset="phantom", root_path=str(tree_data / "data"), list_dir=str(tree_data / "list"),
                      output_root=str(tmp_path / "ckpt"), model_kwargs={"base_channels": 4, "depth": 2},
                      salience="none", img_size=(32, 32), batch_size=2, num_workers=0, max_iterations=2,
                      classes=["portal", "hepatic"], seed=0)
    train(cfg)
    out = tmp_path / "out"
    rc = predict.main(["--model", str(cfg.run_dir() / "best_model.pth"), "--input",
                       str(tree_data / "raw" / "3Dircadb1.1"), "--output", str(out), "--device", "cpu",
                       "--mesh", "--figures", "--dicom_seg", "--min_component_mm3", "0"])
    assert rc == 0, capsys.readouterr().err
    case = "3Dircadb1.1"
    for name in ("_trees.nii.gz", "_portal.stl", "_hepatic.stl", "_vessels.stl", "_3d.png", "_mip.png", "_seg.dcm"):
        assert (out / f"{case}{name}").is_file(), name
    trees = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_trees.nii.gz")))
    vessels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_vessels.nii.gz")))
    assert set(np.unique(trees)) <= {0, 1, 2} and np.array_equal(trees > 0, vessels > 0)
    stats = json.loads((out / f"{case}_stats.json").read_text())
    assert stats["stats"]["trees_label_values"] == {"portal": 1, "hepatic": 2}
    for k, c in ((1, "portal"), (2, "hepatic")):
        assert stats["stats"]["trees"][c]["vessel_voxels"] == int((trees == k).sum())
    assert stats["model"]["classes"] == ["portal", "hepatic"]
    import pydicom

    seg = pydicom.dcmread(out / f"{case}_seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["portal vein", "hepatic veins"]


def test_figure_shading_and_mesh_step_worked_values():
    from prediction.segment import LIGHT, figure_mesh_step, shaded_colours

    light = LIGHT / np.linalg.norm(LIGHT)
    # a triangle whose normal is the light direction: full brightness; one edge-on to it: ambient only
    e1 = np.cross(light, [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(light, e1)
    facing = np.array([[0, 0, 0], e1, e2])
    edge_on = np.array([[0, 0, 0], light, e1])
    verts = np.concatenate([facing, edge_on])
    rgb = shaded_colours(verts, np.array([[0, 1, 2], [3, 4, 5]]), (1.0, 0.5, 0.0))
    assert np.allclose(rgb[0], [1.0, 0.5, 0.0]) and np.allclose(rgb[1], [0.35, 0.175, 0.0])
    # a 10^3 cube has 10^3 - 8^3 = 488 boundary voxels: about 976 triangles at step 1
    cube = np.zeros((14, 14, 14), bool)
    cube[2:12, 2:12, 2:12] = True
    assert figure_mesh_step(cube, 1000) == 1 and figure_mesh_step(cube, 976 // 4) == 2
    assert figure_mesh_step(cube, 100) == int(np.ceil(np.sqrt(976 / 100)))
