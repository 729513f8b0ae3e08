"""The automatic liver (issue 26, point 1): inference.liver and predict.py --liver_model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import predict
from inference.liver import (
    DEFAULT_OPENING_MM,
    check_target,
    PLAUSIBLE_LIVER_ML,
    largest_component,
    liver_from_probabilities,
    liver_warnings,
    model_target,
    near_liver,
    opening,
    refine_by_intensity,
)
from networks.checkpoint import save_checkpoint
from networks.registry import build_model
from preprocessing.dicom_reader import read_dicom_patient
from test_predict import phantom_case  # noqa: F401  (a module fixture: a tiny phantom patient and a model)
from utils.h5io import apply_hu_window

pytestmark = pytest.mark.usefixtures("one_thread")


def ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    g = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((x - c * s) ** 2 for x, c, s in zip(g, centre, spacing)) <= radius ** 2


def test_largest_component_keeps_the_bigger_blob():
    m = ball((30, 30, 30), (10, 10, 10), 6) | ball((30, 30, 30), (24, 24, 24), 3)
    out = largest_component(m)
    assert np.array_equal(out, ball((30, 30, 30), (10, 10, 10), 6))
    assert not largest_component(np.zeros((4, 4, 4), bool)).any()


REFINE_SHAPE, REFINE_SPACING = (64, 64, 32), (1.0, 1.0, 2.0)
REFINE_CENTRE, REFINE_RADIUS = (32, 32, 16), 20.0  # voxels; mm


def refine_scene(seed: int = 0):
    """A liver ball of 20 mm (HU 100 +- 10, noise) in fat (-100 HU) on 1 x 1 x 2 mm voxels."""
    rng = np.random.default_rng(seed)
    liver = ball(REFINE_SHAPE, REFINE_CENTRE, REFINE_RADIUS, REFINE_SPACING)
    hu = np.where(liver, 100.0, -100.0) + rng.normal(0, 10, REFINE_SHAPE)
    return liver, hu.astype(np.float32)


def test_refine_by_intensity_removes_a_neighbour_organ_and_keeps_lesions():
    liver, hu = refine_scene()
    # a neighbouring organ at 40 HU (6 deviations off the parenchyma) touches the liver, and the
    # model took the part of it within 6 mm of the liver for liver
    organ = np.zeros(REFINE_SHAPE, bool)
    organ[52:, :, :] = True
    organ &= ~liver
    hu[organ] = 40.0 + np.random.default_rng(1).normal(0, 10, int(organ.sum()))
    taken = organ & near_liver(liver, REFINE_SPACING, 6.0)
    # a hypodense lesion 2-6 mm under the surface, inside the band, is liver (holes are filled)
    lesion = ball(REFINE_SHAPE, (32, 32 + 14, 16), 3.5, REFINE_SPACING) & liver
    hu[lesion] = 40.0
    mask = liver | taken
    prob = mask.astype(np.float32)
    out = refine_by_intensity(mask, prob, hu, REFINE_SPACING)
    assert not out[taken].any()
    assert out[lesion].all()
    # inside the band, parenchyma voxels whose noise lies beyond 2.5 deviations (about 1%) are removed
    # where they touch the surface; all else is the true liver
    assert (out & ~liver).sum() == 0
    assert (liver & ~out).sum() < 0.02 * liver.sum()
    # without the refinement's band nothing is removed
    assert np.array_equal(refine_by_intensity(mask, prob, hu, REFINE_SPACING, band_mm=0.0, grow_mm=0.0), mask)


def test_refine_by_intensity_grows_an_edge_placed_too_far_in():
    liver, hu = refine_scene()
    # the model's liver is the ball 2 mm too small; it is unsure within 4 mm outside its mask
    small = ball(REFINE_SHAPE, REFINE_CENTRE, REFINE_RADIUS - 2.0, REFINE_SPACING)
    prob = np.where(small, 0.9, np.where(near_liver(small, REFINE_SPACING, 4.0), 0.3, 0.0)).astype(np.float32)
    out = refine_by_intensity(small, prob, hu, REFINE_SPACING, band_mm=0.0)
    # every liver voxel within 3 mm whose HU is parenchyma-like (within 2 deviations) is added;
    # fat never is
    grown = ~small & near_liver(small, REFINE_SPACING, 3.0)
    assert not out[~liver].any()
    assert out[small].all()
    got = (out & grown & liver).sum() / (grown & liver).sum()
    assert 0.93 < got <= 1.0  # about 95% of normal noise lies within 2 deviations, holes filled add some
    # noise-free parenchyma (every liver voxel at the median): the ball grows back exactly, up to the
    # bounding box's edge, which lies within the growth of the small ball
    clean = np.where(liver, 100.0, -100.0).astype(np.float32)
    assert np.array_equal(refine_by_intensity(small, prob, clean, REFINE_SPACING, band_mm=0.0), liver)
    # a probability under grow_prob adds nothing
    assert np.array_equal(refine_by_intensity(small, prob, hu, REFINE_SPACING, band_mm=0.0, grow_prob=0.5), small)


def test_refine_by_intensity_leaves_a_tiny_liver_and_refuses_bad_shapes():
    tiny = ball((20, 20, 20), (10, 10, 10), 4.0)
    hu = np.where(tiny, 100.0, -100.0).astype(np.float32)
    assert np.array_equal(refine_by_intensity(tiny, tiny.astype(np.float32), hu, (1, 1, 1)), tiny)
    with pytest.raises(ValueError, match="one shape"):
        refine_by_intensity(tiny, tiny[:-1].astype(np.float32), hu, (1, 1, 1))
    for bad in ({"band_mm": -1.0}, {"grow_z": float("nan")}, {"grow_prob": 1.5}, {"grow_prob": -0.1}):
        with pytest.raises(ValueError, match=">= 0"):
            refine_by_intensity(tiny, tiny.astype(np.float32), hu, (1, 1, 1), **bad)


def test_liver_from_probabilities_fills_vessels_and_drops_other_organs():
    shape = (40, 40, 30)
    organ = ball(shape, (20, 20, 15), 12.5)  # its end slices are disks wider than the vessel
    # a "vessel" through the liver along the slice axis: a hole open to the outside in 3-D,
    # closed in every slice; and a separate "spleen"
    tube = np.zeros(shape, bool)
    tube[19:22, 19:22, 8:] = True  # open to the outside at the top
    spleen = ball(shape, (3, 3, 3), 2)
    prob = np.where((organ & ~tube) | spleen, 0.9, 0.1).astype(np.float32)
    liver = liver_from_probabilities(prob)
    assert np.array_equal(liver, organ)
    with pytest.raises(ValueError, match="must be"):
        liver_from_probabilities(prob[0])


def test_opening_cuts_thin_bridges_and_small_pieces_and_keeps_a_big_ball():
    sp = (1.0, 1.0, 2.0)
    shape = (70, 40, 20)
    big = ball(shape, (20, 20, 10), 12.0, sp)
    small = ball(shape, (58, 20, 10), 3.0, sp)          # radius 3 mm < 5: gone
    bridge = np.zeros(shape, bool)
    bridge[30:56, 19:21, 9:11] = True                   # 2 mm thick: gone
    got = opening(big | small | bridge, sp, 5.0)
    assert not got[small].any() and not got[45:50].any()
    # the big ball (radius 12 mm) comes back whole up to the voxel grid
    inter = (got & big).sum()
    assert 2 * inter / (got.sum() + big.sum()) > 0.97 and not (got & ~ball(shape, (20, 20, 10), 13.0, sp)).any()
    prob = (big | small | bridge).astype(np.float32)
    assert np.array_equal(liver_from_probabilities(prob, 0.5, sp, 5.0), got)
    with pytest.raises(ValueError, match="three spacings"):
        liver_from_probabilities(prob, 0.5, None, 5.0)


@pytest.mark.parametrize("spacing,margin", [((1.0, 1.0, 1.0), 3.0), ((0.7, 0.7, 2.5), 5.0), ((0.8, 0.8, 1.6), 0.0)])
def test_near_liver_is_the_set_within_the_margin_in_mm(spacing, margin):
    shape = (50, 50, 24)
    liver = ball(shape, (25, 25, 12), 6.0, spacing) & (np.arange(shape[0])[:, None, None] < 27)
    got = near_liver(liver, spacing, margin)
    # brute force: distance in mm from every voxel centre to the nearest liver voxel centre
    pts = np.argwhere(liver) * np.array(spacing)
    allp = np.argwhere(np.ones(shape, bool)) * np.array(spacing)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(pts).query(allp)
    expected = (d <= margin + 1e-9).reshape(shape)
    assert np.array_equal(got, expected)
    assert got[liver].all()
    with pytest.raises(ValueError, match=">= 0"):
        near_liver(liver, spacing, -1)


def test_liver_warnings_flag_implausible_volumes_and_livers_the_scan_cuts_off():
    sp = (2.0, 2.0, 2.5)
    shape = (100, 100, 60)
    # a ball of radius 70 mm holds 4/3 pi 70^3 = 1437 mL (voxelised: within 2%)
    liver = ball(shape, (50, 50, 30), 70.0, sp)
    assert liver.sum() * np.prod(sp) / 1000 == pytest.approx(4 / 3 * np.pi * 70 ** 3 / 1000, rel=0.02)
    assert liver_warnings(liver, sp, "p") == []
    # 40 mm: 268 mL, under the range; only a model's liver is judged by its volume
    small = ball(shape, (50, 50, 30), 40.0, sp)
    ml = small.sum() * np.prod(sp) / 1000
    assert ml == pytest.approx(4 / 3 * np.pi * 40 ** 3 / 1000, rel=0.02)
    (w,) = liver_warnings(small, sp, "p")
    assert w.startswith("p: ") and f"{ml:.0f} mL" in w and f"{PLAUSIBLE_LIVER_ML[0]:.0f}-{PLAUSIBLE_LIVER_ML[1]:.0f}" in w
    assert liver_warnings(small, sp, "p", check_volume=False) == []
    # the same 1437 mL ball moved to the last slice: cut off by the scan (and smaller, still in range)
    cut = ball(shape, (50, 50, 52), 70.0, sp)
    assert cut.sum() * np.prod(sp) / 1000 > PLAUSIBLE_LIVER_ML[0]
    (w,) = liver_warnings(cut, sp, "p", check_volume=False)
    assert "last slice" in w and "first" not in w
    both = np.ones(shape, bool)  # 1500 mL, every slice
    assert "first and last slice (100% and 100% of its largest" in liver_warnings(both, sp, "p")[0]
    # a tip that grazes the last slice (the ball's centre 67.5 mm below it) is no cut: the
    # cross-section there, 1 - (67.5 / 70)^2 = 7% of the largest, is under CUT_OFF_AREA (10%);
    # with the centre 60 mm below it is 1 - (60 / 70)^2 = 27%, a cut
    last = (shape[2] - 1) * sp[2]
    for gap_mm, warned in ((67.5, False), (60.0, True)):
        centre = (last - gap_mm) / sp[2]
        b = ball(shape, (50, 50, centre), 70.0, sp)
        area = b.sum(axis=(0, 1))
        assert area[-1] / area.max() == pytest.approx(1 - (gap_mm / 70) ** 2, abs=0.02)
        got = liver_warnings(b, sp, "p", check_volume=False)
        assert (len(got) == 1 and f"({100 * area[-1] / area.max():.0f}% of its largest" in got[0]) == warned
        assert warned or got == []
    assert liver_warnings(np.zeros(shape, bool), sp, "p") == []
    with pytest.raises(ValueError, match="must be"):
        liver_warnings(liver[0], sp, "p")


def test_model_target_reads_the_training_label():
    assert model_target({"manifests": {"dataset": {"vessel_classes": ["liver"]}}}) == "liver"
    assert model_target({"manifests": {"dataset": {"vessel_classes": ["portalvein", "venoussystem"]}}}) == "vessels"
    assert model_target({"manifests": {}}) is None
    vessel = {"manifests": {"dataset": {"vessel_classes": ["portalvein"]}}}
    with pytest.raises(ValueError, match="m.pth: this is a vessels model"):
        check_target(vessel, "m.pth", "liver")


# ----------------------------------------------------------------------------- predict.py --liver_model
THRESHOLD_IMAGE = 0.2  # the stand-in liver model: liver where the windowed image >= 0.2 (80 HU)
SLOPE = 60.0


def intensity_liver_model(path: Path, target=("liver",)) -> Path:
    """A one-layer example_fcn checkpoint whose logit is SLOPE * (image - THRESHOLD_IMAGE), native
    grid (no resize), labelled as trained on ``target`` masks: a liver model with a known output."""
    kw = {"width": 1, "layers": 1}
    model = build_model("example_fcn", in_channels=1, out_channels=1, **kw).eval()
    conv, bn, _, last = model
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        conv.bias.zero_()
        bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps), bn.weight.fill_(1.0), bn.bias.zero_()
        last.weight.fill_(SLOPE)
        last.bias.fill_(-SLOPE * THRESHOLD_IMAGE)
    save_checkpoint(path, model, model_name="example_fcn", model_kwargs=kw, salience="none", config={}, epoch=1,
                    iteration=1, best_metric=0.0, manifests={"dataset": {"vessel_classes": list(target)}})
    return path


def test_segment_liver_returns_the_probabilities_its_masks_came_from(tmp_path):
    """segment_liver's prob is the model's output on the scan (the stand-in's known logit), and its
    model_mask and mask are what liver_from_probabilities and the refinement make of that prob."""
    from inference.liver import segment_liver
    from inference.predictor import Predictor
    spacing = (1.0, 1.0, 1.0)
    organ = ball((40, 40, 40), (20, 20, 20), 14.0)
    hu = np.where(organ, 110.0, -50.0).astype(np.float32) + np.random.default_rng(0).normal(0, 3, organ.shape)
    seg = Predictor.from_checkpoint(intensity_liver_model(tmp_path / "liver.pth"), "cpu")
    found = segment_liver(seg, hu, spacing)
    want = 1.0 / (1.0 + np.exp(-SLOPE * (apply_hu_window(hu) - THRESHOLD_IMAGE)))
    assert found.prob.shape == hu.shape and np.allclose(found.prob, want, atol=1e-4)
    model_mask = liver_from_probabilities(found.prob, seg.threshold, spacing, DEFAULT_OPENING_MM)
    assert np.array_equal(found.model_mask, model_mask)
    assert np.array_equal(found.mask, refine_by_intensity(model_mask, found.prob, hu, spacing))
    assert found.mask.sum() == pytest.approx(organ.sum(), rel=0.02)


def test_predict_with_a_liver_model_writes_its_liver_and_keeps_vessels_near_it(phantom_case, tmp_path, capsys):
    pat = phantom_case["patient"]
    lm = intensity_liver_model(tmp_path / "liver.pth")
    out = tmp_path / "out"
    margin = 2.0
    rc = predict.main(["--model", str(phantom_case["model"]), "--input", str(pat), "--output", str(out),
                       "--liver_model", str(lm), "--liver_margin", str(margin), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    case = "3Dircadb1.1"
    assert (out / f"{case}_liver.nii.gz").is_file()
    data = read_dicom_patient(pat, ("portalvein",))
    liver = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_liver.nii.gz"))), (1, 2, 0))
    # the stand-in model's liver, worked out without it: threshold, largest piece, holes filled,
    # then the intensity refinement (on by default)
    image = apply_hu_window(data.hu)
    prob = torch.sigmoid(SLOPE * (torch.from_numpy(image.astype(np.float32)) - THRESHOLD_IMAGE)).numpy()
    unrefined = liver_from_probabilities(prob, 0.5, data.spacing, DEFAULT_OPENING_MM)
    expected = refine_by_intensity(unrefined, prob, data.hu, data.spacing)
    assert 0 < expected.sum() < expected.size and not np.array_equal(expected, unrefined)
    assert np.array_equal(liver.astype(bool), expected)
    vessels = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_vessels.nii.gz"))), (1, 2, 0))
    assert vessels.any()
    assert not vessels[~near_liver(expected, data.spacing, margin)].any()
    stats = json.loads((out / f"{case}_stats.json").read_text())
    assert stats["stats"]["liver"]["source"] == "model" and stats["stats"]["liver"]["margin_mm"] == margin
    assert stats["stats"]["liver"]["refined_by_intensity"] is True
    assert stats["stats"]["liver"]["volume_ml"] == pytest.approx(expected.sum() * np.prod(data.spacing) / 1000)
    assert stats["provenance"]["options"]["liver_model"] == stats["liver_model"]["sha256"]
    expected_warnings = liver_warnings(expected, data.spacing, case)
    assert expected_warnings and set(expected_warnings) <= set(stats["warnings"])

    # another option is another output, recomputed: --liver_refine alone, then the margin too;
    # without the refinement the liver is the model's own mask, and with no margin no vessel lies
    # outside it
    assert predict.main(["--model", str(phantom_case["model"]), "--input", str(pat), "--output", str(out),
                         "--liver_model", str(lm), "--liver_margin", str(margin), "--liver_refine", "0",
                         "--device", "cpu"]) == 0
    liver0 = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_liver.nii.gz"))), (1, 2, 0))
    assert np.array_equal(liver0.astype(bool), unrefined)
    assert predict.main(["--model", str(phantom_case["model"]), "--input", str(pat), "--output", str(out),
                         "--liver_model", str(lm), "--liver_margin", "0", "--liver_refine", "0",
                         "--device", "cpu"]) == 0
    v0 = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_vessels.nii.gz"))), (1, 2, 0))
    assert v0.any() and not v0[~unrefined].any()
    assert json.loads((out / f"{case}_stats.json").read_text())["stats"]["liver"]["refined_by_intensity"] is False

    # --liver_mask overrides: the given mask is used as it is and no liver file is written
    out2 = tmp_path / "out2"
    assert predict.main(["--model", str(phantom_case["model"]), "--input", str(pat), "--output", str(out2),
                         "--liver_model", str(lm), "--liver_mask", str(pat / "MASKS_DICOM" / "liver"),
                         "--device", "cpu"]) == 0
    assert not (out2 / f"{case}_liver.nii.gz").exists()
    stats2 = json.loads((out2 / f"{case}_stats.json").read_text())
    assert stats2["stats"]["liver"]["source"] == "mask"
    assert not any("mL, outside" in w for w in stats2["warnings"])  # a given mask's volume is the user's
    # the liver model's own settings are said not to apply
    capsys.readouterr()
    assert predict.main(["--model", str(phantom_case["model"]), "--input", str(pat), "--output", str(tmp_path / "o3"),
                         "--liver_model", str(lm), "--liver_mask", str(pat / "MASKS_DICOM" / "liver"),
                         "--liver_margin", "2", "--device", "cpu"]) == 0
    assert "--liver_margin (its settings) do not apply" in capsys.readouterr().err


def test_models_given_for_the_wrong_job_are_refused(phantom_case, tmp_path, capsys):
    pat = str(phantom_case["patient"])
    vessel_labelled = intensity_liver_model(tmp_path / "v.pth", target=("portalvein", "venoussystem"))
    liver = intensity_liver_model(tmp_path / "l.pth")
    for args, needle in ((["--model", str(phantom_case["model"]), "--liver_model", str(vessel_labelled)],
                          "v.pth: this is a vessels model"),
                         (["--model", str(liver)], "l.pth: this is a liver model")):
        rc = predict.main(args + ["--input", pat, "--output", str(tmp_path / "o"), "--device", "cpu"])
        assert rc == 1 and needle in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def read_nifti(path: Path) -> np.ndarray:
    return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (1, 2, 0))


def test_a_vessel_model_with_its_liver_model_embedded_predicts_as_the_two_files(phantom_case, tmp_path, capsys):
    from scripts import embed_liver
    from utils.provenance import file_sha256
    pat, case = str(phantom_case["patient"]), "3Dircadb1.1"
    lm = intensity_liver_model(tmp_path / "liver.pth")
    both = tmp_path / "both.pth"
    assert embed_liver.main(["--model", str(phantom_case["model"]), "--liver_model", str(lm),
                             "--out", str(both)]) == 0
    assert f"model: {both}" in capsys.readouterr().out
    # it names the vessel model it was made from (tree models' branch networks know that one)
    assert torch.load(both, weights_only=False)["vessel_model_sha256"] == file_sha256(phantom_case["model"])
    common = ["--input", pat, "--liver_margin", "2", "--device", "cpu"]
    assert predict.main(["--model", str(phantom_case["model"]), "--liver_model", str(lm),
                         "--output", str(tmp_path / "two"), *common]) == 0
    assert predict.main(["--model", str(both), "--output", str(tmp_path / "one"), *common]) == 0
    for name in (f"{case}_liver.nii.gz", f"{case}_vessels.nii.gz"):
        assert np.array_equal(read_nifti(tmp_path / "one" / name), read_nifti(tmp_path / "two" / name)), name
    stats = json.loads((tmp_path / "one" / f"{case}_stats.json").read_text())
    assert stats["provenance"]["options"]["liver_model"] == file_sha256(lm)
    assert stats["stats"]["liver"]["source"] == "model"

    # --no_liver_model: the whole scan, as the vessel model alone gives it
    assert predict.main(["--model", str(both), "--no_liver_model", "--output", str(tmp_path / "none"), *common]) == 0
    assert predict.main(["--model", str(phantom_case["model"]), "--output", str(tmp_path / "plain"), *common]) == 0
    assert not (tmp_path / "none" / f"{case}_liver.nii.gz").exists()
    assert np.array_equal(read_nifti(tmp_path / "none" / f"{case}_vessels.nii.gz"),
                          read_nifti(tmp_path / "plain" / f"{case}_vessels.nii.gz"))


def test_embedding_refuses_wrong_jobs_and_existing_outputs(phantom_case, tmp_path, capsys):
    from scripts import embed_liver
    lm = intensity_liver_model(tmp_path / "liver.pth")
    vessel_labelled = intensity_liver_model(tmp_path / "v.pth", target=("portalvein", "venoussystem"))
    out = tmp_path / "both.pth"
    for model, liver, needle in ((lm, lm, "liver.pth: this is a liver model"),
                                 (phantom_case["model"], vessel_labelled, "v.pth: this is a vessels model")):
        assert embed_liver.main(["--model", str(model), "--liver_model", str(liver), "--out", str(out)]) == 1
        assert needle in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".both.pth*"))
    out.write_bytes(b"earlier")
    assert embed_liver.main(["--model", str(phantom_case["model"]), "--liver_model", str(lm), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"earlier"
    assert embed_liver.main(["--model", str(phantom_case["model"]), "--liver_model", str(lm), "--out", str(out),
                             "--overwrite"]) == 0
    assert out.read_bytes() != b"earlier"


def _has_colour(png: np.ndarray, rgb, tol: float = 0.04) -> bool:
    return bool((np.abs(png[..., :3] - np.asarray(rgb, dtype=np.float32)) <= tol).all(axis=-1).any())


def test_masks_figure_paints_each_mask_against_the_truth_on_the_slice_that_changed_most(tmp_path):
    from bench.liver_bench import changed_slice
    from evaluation.figures import COLOURS, masks_figure
    import matplotlib.image as mpimg

    shape = (40, 40, 6)
    truth = np.zeros(shape, bool)
    truth[10:30, 10:30, :] = True
    model = truth.copy()
    model[30:36, 10:30, 4] = True  # the model took a neighbour for liver in slice 4 only
    assert changed_slice(model, truth) == 4
    image = np.zeros(shape, np.float32)
    # blended at 0.6 over a black image: what a painted voxel looks like (the legend's colours are pure)
    painted = {k: 0.6 * np.asarray(v) for k, v in COLOURS.items()}
    z = changed_slice(model, truth)
    same = masks_figure(tmp_path / "same.png", [("p", image[:, :, z], {"a": truth[:, :, z], "b": truth[:, :, z]},
                                                 truth[:, :, z])], [0.5])
    png = mpimg.imread(same)
    assert _has_colour(png, painted["TP"]) and not _has_colour(png, painted["FP"])
    fp = masks_figure(tmp_path / "fp.png", [("p", image[:, :, z], {"model": model[:, :, z], "refined": truth[:, :, z]},
                                             truth[:, :, z])], [0.5])
    assert _has_colour(mpimg.imread(fp), painted["FP"]) and not _has_colour(mpimg.imread(fp), painted["FN"])
    with pytest.raises(ValueError, match="one shape"):
        masks_figure(tmp_path / "bad.png", [("p", image[:, :, z], {"a": truth[:-1, :, z]}, truth[:, :, z])], [0.5])
    with pytest.raises(ValueError, match="one aspect per row"):
        masks_figure(tmp_path / "bad.png", [("p", image[:, :, z], {"a": truth[:, :, z]}, truth[:, :, z])], [])
