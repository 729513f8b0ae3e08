"""test.py end to end on the tiny dataset, its reports, prediction files and bad input."""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from evaluation.metrics import evaluate_case
from evaluation.predictions import from_sitk, save_prediction, to_sitk
from evaluation.reports import markdown_table, summarize
from evaluation.runner import run_evaluation
from utils.h5io import read_volume, write_list

ROOT = Path(__file__).resolve().parents[1]
# load the top-level test.py by path: the name "test" also belongs to the standard library
_spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "test.py")
cli = importlib.util.module_from_spec(_spec)
sys.modules["evaluate_cli"] = cli
_spec.loader.exec_module(cli)

checkpoint = pytest.importorskip("networks.checkpoint")
from networks.e2e import build_segmenter  # noqa: E402

TINY_2D = {"base_channels": 4, "depth": 2}


def _save_ckpt(path: Path, name: str, salience: str, kwargs: dict, **kw) -> Path:
    torch.manual_seed(0)
    model = build_segmenter(name, salience, 1, kwargs)
    checkpoint.save_checkpoint(path, model, model_name=name, model_kwargs=kwargs, salience=salience,
                               config={"dataset": "tiny"}, epoch=1, iteration=10, best_metric=0.5, **kw)
    return path


def _two_case_test_split(ds) -> list[str]:
    cases = ["case0004", "case0005"]
    write_list(ds.paths.list_file("vol_test"), cases)
    return cases


def test_end_to_end_2d_offline_resized_roi_nifti_figures(tiny_dataset, tmp_path):
    ds = tiny_dataset
    cases = _two_case_test_split(ds)
    ckpt = _save_ckpt(tmp_path / "run" / "best_model.pth", "unet", "offline", TINY_2D, img_size=[24, 24])
    res = run_evaluation(dataset=ds.dataset, backbone="unet", root_path=ds.root_path, list_dir=ds.list_dir,
                             model_path=ckpt, eval_roi="liver", save_pred="nifti", figures=True, device="cpu")
    out = tmp_path / "run" / "eval_test_roi-liver"
    assert res.output == out and not res.skipped
    for f in ("per_case.csv", "summary.json", "results.md"):
        assert (out / f).is_file(), f
    for case in cases:
        assert (out / "figures" / f"{case}_overlay.png").stat().st_size > 1000
        assert (out / "figures" / f"{case}_mip.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert [r["case"] for r in rows] == cases
    # the reported metrics are those of the saved probabilities, read back through NIfTI
    for r in rows:
        vol = read_volume(ds.paths.volume(r["case"]))
        img = sitk.ReadImage(str(out / "predictions" / f"{r['case']}_pred.nii.gz"))
        prob, spacing = from_sitk(img)
        assert prob.shape == vol.image.shape and spacing == pytest.approx(vol.spacing)
        m = evaluate_case(prob >= 0.5, vol.label, vol.spacing, roi=vol.liver.astype(bool))
        for k in ("dice", "cldice", "hd95_mm", "specificity", "cl_recall_1to2", "components_pred"):
            a, b = float(r[k]), m[k]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b), k
    summ = json.loads((out / "summary.json").read_text())
    assert summ["n_cases"] == 2 and summ["meta"]["img_size"] == [24, 24] and summ["meta"]["salience"] == "offline"
    dice = [float(r["dice"]) for r in rows]
    assert summ["metrics"]["dice"]["mean"] == pytest.approx(np.nanmean(dice))
    md = (out / "results.md").read_text()
    assert "| case0004 |" in md and "mean ± std" in md and "95% CI" in md

    # a second run keeps the complete report; --overwrite redoes it
    stamp = (out / "per_case.csv").stat().st_mtime_ns
    again = run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=ckpt,
                               eval_roi="liver", device="cpu")
    assert again.skipped and (out / "per_case.csv").stat().st_mtime_ns == stamp
    assert again.summary["dice"]["mean"] == pytest.approx(summ["metrics"]["dice"]["mean"])
    redo = run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=ckpt,
                              eval_roi="liver", device="cpu", overwrite=True)
    assert not redo.skipped and not (out / "figures").exists()


def test_cli_3d_default_checkpoint_and_output(tiny_dataset, tmp_path, capsys):
    ds = tiny_dataset
    _two_case_test_split(ds)
    ck_root = tmp_path / "checkpoint"
    old = _save_ckpt(ck_root / ds.dataset / "unet3d" / "old" / "best_model.pth", "unet3d", "none",
                     {"base_channels": 2, "depth": 2}, patch_size=[16, 16, 8])
    new = _save_ckpt(ck_root / ds.dataset / "unet3d" / "new" / "best_model.pth", "unet3d", "none",
                     {"base_channels": 2, "depth": 2}, patch_size=[16, 16, 8])
    os.utime(old, (1e9, 1e9))
    argv = ["--dataset", ds.dataset, "--backbone", "unet3d", "--root_path", str(ds.root_path),
            "--list_dir", str(ds.list_dir), "--checkpoint_root", str(ck_root), "--device", "cpu",
            "--tta", "--overlap", "0.25", "--save_pred", "h5", "--pred_kind", "mask"]
    # two runs match: no guessing by age, the error lists both
    capsys.readouterr()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "2 runs match" in err and str(old) in err and str(new) in err
    rc = cli.main(argv + ["--exp", "new"])
    assert rc == 0
    out = new.parent / "eval_test_tta"
    assert (out / "summary.json").is_file()
    assert not (old.parent / "eval_test_tta").exists()
    with h5py.File(out / "predictions" / "case0005_pred.h5") as f:
        assert f["mask"].dtype == np.uint8 and f["mask"].shape == (32, 32, 12)
        assert tuple(f.attrs["spacing"]) == pytest.approx((0.8, 0.8, 1.6))
    printed = capsys.readouterr().out
    assert "case0005" in printed and "mean" in printed and "Dice" in printed


def _assert_fails_cleanly(argv, capsys, must_mention: str, out_dir: Path):
    capsys.readouterr()
    rc = cli.main(argv + ["--output", str(out_dir), "--device", "cpu"])
    assert rc != 0
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert must_mention in errors[0], errors[0]
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]


def test_bad_input_fails_with_one_line_and_no_report(tiny_dataset, tmp_path, capsys):
    ds = tiny_dataset
    good = _save_ckpt(tmp_path / "ck" / "best_model.pth", "unet", "offline", TINY_2D, img_size=[32, 32])
    base = ["--dataset", ds.dataset, "--root_path", str(ds.root_path), "--list_dir", str(ds.list_dir)]
    out = tmp_path / "report"

    # checkpoint of another backbone
    _assert_fails_cleanly(base + ["--backbone", "unet3d", "--model_path", str(good)], capsys, "'unet'", out)
    # a channel count that the salience mode does not give
    bad = torch.load(good, weights_only=True)
    bad["in_channels"] = 1
    torch.save(bad, tmp_path / "ck" / "chan.pth")
    _assert_fails_cleanly(base + ["--model_path", str(tmp_path / "ck" / "chan.pth")], capsys, "chan.pth", out)
    # not a checkpoint: a plain state dict, and random bytes
    torch.save(bad["state_dict"], tmp_path / "ck" / "plain.pth")
    _assert_fails_cleanly(base + ["--model_path", str(tmp_path / "ck" / "plain.pth")], capsys, "plain.pth", out)
    (tmp_path / "ck" / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    _assert_fails_cleanly(base + ["--model_path", str(tmp_path / "ck" / "junk.pth")], capsys, "junk.pth", out)
    # an empty --model_path (a script's model variable left empty) or a folder; a tree model folder
    _assert_fails_cleanly(base + ["--model_path", ""], capsys, "--model_path is empty", out)
    _assert_fails_cleanly(base + ["--model_path", str(tmp_path / "ck")], capsys,
                          "ck: model file not found (a folder: give the best_model.pth in it)", out)
    _assert_fails_cleanly(base + ["--model_path", str(good), "--tree_model", str(tmp_path / "ck")], capsys,
                          "ck: tree model file not found (a folder: give the tree_model.pth in it)", out)
    # missing list
    _assert_fails_cleanly(base + ["--model_path", str(good), "--split", "val", "--list_dir", str(tmp_path / "nolist")],
                          capsys, "vol_val.txt", out)
    # a listed volume that does not exist
    write_list(ds.paths.list_file("vol_test"), ["case0005", "case0099"])
    _assert_fails_cleanly(base + ["--model_path", str(good)], capsys, "case0099.h5", out)
    # a label of another shape than the image (second case: the first one must not leave files)
    bad_vol = ds.paths.volume("case0004")
    with h5py.File(bad_vol, "r+") as f:
        del f["label"]
        f["label"] = np.zeros((32, 32, 11), np.uint8)
    write_list(ds.paths.list_file("vol_test"), ["case0005", "case0004"])
    _assert_fails_cleanly(base + ["--model_path", str(good)], capsys, "case0004.h5", out)


def test_offline_checkpoint_without_salience_data(tiny_dataset_no_salience, tmp_path, capsys):
    ds = tiny_dataset_no_salience
    good = _save_ckpt(tmp_path / "ck" / "best_model.pth", "unet", "offline", TINY_2D, img_size=[32, 32])
    _assert_fails_cleanly(["--dataset", ds.dataset, "--root_path", str(ds.root_path), "--list_dir",
                           str(ds.list_dir), "--model_path", str(good)], capsys, "salience", tmp_path / "rep")


def test_nifti_round_trip_keeps_axes_and_spacing(tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.uniform(size=(7, 5, 3)).astype(np.float32)
    image = rng.uniform(size=(7, 5, 3)).astype(np.float32)
    spacing = (0.7, 0.8, 2.5)
    written = save_prediction(tmp_path, "c1", prob, spacing, "nifti", image=image, crop=(2, 9, 0, 5, 10, 13))
    assert [p.name for p in written] == ["c1_pred.nii.gz", "c1_image.nii.gz"]
    img = sitk.ReadImage(str(written[0]))
    # ITK: x = column (W), y = row (H), z = slice (D); spacing (col, row, slice)
    assert img.GetSize() == (5, 7, 3)
    assert img.GetSpacing() == pytest.approx((0.8, 0.7, 2.5))
    assert img.GetOrigin() == pytest.approx((0.0, 2 * 0.7, 10 * 2.5))
    assert img.GetPixel(4, 6, 2) == pytest.approx(float(prob[6, 4, 2]))
    back, sp = from_sitk(img)
    np.testing.assert_array_equal(back, prob)
    assert sp == pytest.approx(spacing)
    back_img, _ = from_sitk(sitk.ReadImage(str(written[1])))
    np.testing.assert_array_equal(back_img, image)
    mask = save_prediction(tmp_path, "c2", prob, spacing, "nifti", as_mask=True)[0]
    np.testing.assert_array_equal(from_sitk(sitk.ReadImage(str(mask)))[0], (prob >= 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="H, W, D"):
        to_sitk(prob[..., 0], spacing)


def test_summary_statistics_and_table():
    rows = [{"case": f"c{i}", "dice": v} for i, v in enumerate([1.0, 2.0, 3.0, float("nan")])]
    s = summarize(rows, ["dice"])["dice"]
    assert s["n"] == 3 and s["n_nan"] == 1 and s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} (tables: 4.303)
    assert s["ci95_low"] == pytest.approx(2.0 - half) and s["ci95_high"] == pytest.approx(2.0 + half)
    one = summarize([{"case": "a", "dice": 0.5}], ["dice"])["dice"]
    assert one["mean"] == 0.5 and math.isnan(one["std"]) and math.isnan(one["ci95_low"])
    md = markdown_table(rows, {"dice": s}, columns=(("dice", "Dice", "{:.2f}"),))
    lines = md.strip().splitlines()
    assert lines[0] == "| Case | Dice |" and "| c3 | n/a |" in lines and lines[-2] == "| **mean ± std** | 2.00 ± 1.00 |"


def test_empty_prediction_is_reported_not_fatal(tiny_dataset, tmp_path, caplog):
    ds = tiny_dataset
    _two_case_test_split(ds)
    kwargs = {"base_channels": 2, "depth": 2}
    model = build_segmenter("unet", "none", 1, kwargs)
    last_bias = [k for k in model.state_dict() if k.endswith("bias")][-1]
    with torch.no_grad():
        model.state_dict()[last_bias].fill_(-1e4)  # every logit very negative: an empty prediction
    ck = tmp_path / "run" / "best_model.pth"
    checkpoint.save_checkpoint(ck, model, model_name="unet", model_kwargs=kwargs, salience="none", config={},
                               epoch=0, iteration=0, best_metric=0.0, img_size=[32, 32])
    with caplog.at_level(logging.WARNING, logger="test"):
        res = run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=ck,
                             device="cpu")
    assert all(r["empty_pred"] == 1 and r["dice"] == 0.0 and math.isnan(r["hd95_mm"]) for r in res.rows)
    warned = [m for m in caplog.messages if "predicts no vessel" in m]
    assert len(warned) == 2 and all(f"holds {r['voxels_true']} voxels" in w for r, w in zip(res.rows, warned))
    assert all(r["case"] in w for r, w in zip(res.rows, warned))
    assert res.summary["hd95_mm"]["n_nan"] == 2 and res.summary["dice"]["n"] == 2
    summ = json.loads((res.output / "summary.json").read_text())
    assert summ["meta"]["n_empty_pred"] == 2 and summ["metrics"]["hd95_mm"]["mean"] is None


def test_find_checkpoint_by_exp_and_salience(tmp_path):
    from evaluation.runner import find_checkpoint

    root = tmp_path / "checkpoint"
    a = _save_ckpt(root / "tiny" / "unet" / "epo1" / "a" / "best_model.pth", "unet", "offline", TINY_2D)
    b = _save_ckpt(root / "tiny" / "unet" / "epo1" / "b" / "best_model.pth", "unet", "none", TINY_2D)
    (b.parent / "config.json").write_text(json.dumps({"exp": "b", "salience": "none"}))
    assert find_checkpoint(root, "tiny", "unet", exp="a") == a
    assert find_checkpoint(root, "tiny", "unet", salience="none") == b  # from config.json
    assert find_checkpoint(root, "tiny", "unet", salience="offline") == a  # from the checkpoint itself
    with pytest.raises(ValueError, match="2 runs match"):
        find_checkpoint(root, "tiny", "unet")
    with pytest.raises(FileNotFoundError, match="--exp c"):
        find_checkpoint(root, "tiny", "unet", exp="c")


def test_target_spacing_checkpoint_resamples_each_case_and_warns_of_coarser_cases(tiny_dataset, tmp_path, caplog):
    """A 2-D checkpoint trained at 1.6 mm/pixel: test.py resamples the 0.8 mm cases (32 -> 16 px) and
    maps the prediction back to 32 x 32, without a warning (downsampled, a case looks like the
    training data); a case coarser than the model's spacing is warned about."""
    import logging

    from inference import binarize, predict_volume
    from networks.checkpoint import load_model

    ds = tiny_dataset
    _two_case_test_split(ds)
    ckpt = _save_ckpt(tmp_path / "run" / "best_model.pth", "unet", "none", TINY_2D, img_size=[16, 16],
                      target_spacing=1.6)
    with caplog.at_level(logging.WARNING, logger="test"):
        res = run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=ckpt,
                             save_pred="h5", device="cpu")
    assert not [r for r in caplog.records if "mm/pixel" in r.getMessage()]
    from inference.predictor import spacing_warning
    w = spacing_warning("case", (0.8, 0.8, 1.6), (32, 32), {"target_spacing": 0.5}, [16, 16])
    assert w is not None and "0.8 mm/pixel, 60% coarser than the 0.5 mm/pixel" in w
    assert spacing_warning("case", (0.55, 0.55, 1.6), (32, 32), {"target_spacing": 0.5}, [16, 16]) is None
    assert json.loads((res.output / "summary.json").read_text())["meta"]["target_spacing"] == 1.6
    model, ck = load_model(ckpt)
    vol = read_volume(ds.paths.volume("case0005"))
    ref = predict_volume(model, vol.image, None, salience_mode="none", spatial_dims=2, img_size=[16, 16],
                         target_spacing=1.6, spacing=vol.spacing)
    with h5py.File(res.output / "predictions" / "case0005_pred.h5") as f:
        np.testing.assert_allclose(f["prob"][()], ref, atol=1e-6)
    row = [r for r in res.rows if r["case"] == "case0005"][0]
    assert row["dice"] == pytest.approx(evaluate_case(binarize(ref), vol.label, vol.spacing)["dice"], nan_ok=True)


def test_pixel_resize_checkpoint_warns_when_mm_per_pixel_differs(tiny_dataset, tmp_path, caplog):
    import logging

    ds = tiny_dataset
    _two_case_test_split(ds)
    # trained at 0.9 mm/pixel; the 32 px, 0.8 mm cases at img_size 16 are seen at 1.6 mm/pixel
    ckpt = _save_ckpt(tmp_path / "run" / "best_model.pth", "unet", "none", TINY_2D, img_size=[16, 16],
                      mm_per_pixel=0.9)
    with caplog.at_level(logging.WARNING, logger="test"):
        run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=ckpt, device="cpu")
    assert sum("sees 1.6 mm/pixel" in r.getMessage() for r in caplog.records) == 2
    caplog.clear()
    ok = _save_ckpt(tmp_path / "run2" / "best_model.pth", "unet", "none", TINY_2D, img_size=[16, 16], mm_per_pixel=1.5)
    with caplog.at_level(logging.WARNING, logger="test"):
        run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=ok, device="cpu")
    assert not [r for r in caplog.records if "mm/pixel" in r.getMessage()]


def test_offline_model_on_maps_from_other_weights_warns_per_case(tiny_dataset, tmp_path, caplog):
    """An offline checkpoint records the generator, weights and normalisation its training maps were
    made by; test.py warns for every case whose salience file records others, and not when they
    agree or are unknown."""
    import logging

    from utils.h5io import read_salience, salience_made_by, write_salience

    ds = tiny_dataset
    cases = _two_case_test_split(ds)
    ours, other = "a" * 64, "b" * 64
    for case, sha in zip(cases, (ours, other)):  # the second case's maps were made by other weights
        path = ds.paths.salience(case)
        write_salience(path, read_salience(path), generator="bank", weights_sha256=sha)
        assert salience_made_by(path)[1] == sha
    runs = {}
    for name, head in (("ours", ours), ("unknown", None), ("theirs", "c" * 64)):
        runs[name] = _save_ckpt(tmp_path / name / "best_model.pth", "unet", "offline", TINY_2D, img_size=[24, 24],
                                head_sha256=head)

    def warned(model_path: Path) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=model_path,
                           device="cpu", overwrite=True)
        return [r.getMessage() for r in caplog.records if "the maps the model was trained on" in r.getMessage()]

    msgs = warned(runs["ours"])
    assert len(msgs) == 1 and msgs[0].startswith("case0005: salience made otherwise than the maps the model was "
                                                 "trained on (weights sha256 bbbbbbbbbbbb... vs aaaaaaaaaaaa...")
    assert warned(runs["unknown"]) == []
    assert len(warned(runs["theirs"])) == 2
    # the checkpoint's generator record: another generator (the analytic one has no weights to
    # compare) or another normalisation rule is warned about as well
    record = {"kind": "analytic", "weights_sha256": "", "source": None, "state_dict": None, "normalisation": "volume"}
    analytic = _save_ckpt(tmp_path / "analytic" / "best_model.pth", "unet", "offline", TINY_2D, img_size=[24, 24],
                          generator=record)
    msgs = warned(analytic)
    assert len(msgs) == 2 and all("(generator bank vs analytic," in m for m in msgs)
    fixed = _save_ckpt(tmp_path / "fixed" / "best_model.pth", "unet", "offline", TINY_2D, img_size=[24, 24],
                       generator={**record, "kind": "bank", "weights_sha256": ours, "normalisation": "fixed"})
    msgs = sorted(warned(fixed))
    assert len(msgs) == 2 and "(normalisation volume vs fixed, " in msgs[0] and msgs[0].startswith("case0004")
    assert "(weights sha256 bbbbbbbbbbbb... vs aaaaaaaaaaaa...; normalisation volume vs fixed, " in msgs[1]


def test_checkpoint_min_component_setting_is_applied_and_can_be_overridden(tiny_dataset, tmp_path):
    """The checkpoint's min_component_mm3 post-processes every case before scoring (the saved
    mask too); test.py's --min_component_mm3 replaces it; the report records the value used."""
    from inference import predict_volume, vessel_mask
    from networks.checkpoint import load_model

    ds = tiny_dataset
    _two_case_test_split(ds)
    ckpt = _save_ckpt(tmp_path / "run" / "best_model.pth", "unet", "none", TINY_2D, img_size=[32, 32],
                      min_component_mm3=3.0)
    model, _ = load_model(ckpt)
    vol = read_volume(ds.paths.volume("case0005"))
    ref = predict_volume(model, vol.image, None, salience_mode="none", spatial_dims=2, img_size=[32, 32])
    for override, used in ((None, 3.0), (0.0, 0.0), (1e9, 1e9)):
        res = run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=ckpt,
                             save_pred="h5", pred_kind="mask", device="cpu", output=tmp_path / f"eval_{override}",
                             min_component_mm3=override)
        assert json.loads((res.output / "summary.json").read_text())["meta"]["min_component_mm3"] == used
        mask = vessel_mask(ref, vol.spacing, min_component_mm3=used)
        row = [r for r in res.rows if r["case"] == "case0005"][0]
        assert row["voxels_pred"] == int(mask.sum())
        with h5py.File(res.output / "predictions" / "case0005_pred.h5") as f:
            np.testing.assert_array_equal(f["mask"][()], mask)
    assert row["voxels_pred"] == 0  # nothing is 1e9 mm^3
    with pytest.raises(ValueError, match="min_component_mm3"):
        run_evaluation(dataset=ds.dataset, root_path=ds.root_path, list_dir=ds.list_dir, model_path=ckpt,
                       device="cpu", output=tmp_path / "bad", min_component_mm3=-1.0)


@pytest.mark.parametrize("extra,message", [
    (["--model_path", "m.pth", "--exp", "demo"], "--exp and --checkpoint_root choose a run folder"),
    (["--model_path", "m.pth", "--checkpoint_root", "ck"], "--exp and --checkpoint_root choose a run folder"),
    (["--pred_kind", "mask"], "--pred_kind says what --save_pred writes; give --save_pred"),
])
def test_options_that_would_do_nothing_are_usage_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--dataset", "d", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_given_options_names_what_a_command_line_changed_from_the_defaults():
    import argparse

    from utils.cli import given_options

    p = argparse.ArgumentParser()
    p.add_argument("--label-values", default=None)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--fit", action="store_true")
    args = p.parse_args(["--label-values", "1,2", "--iters", "5"])
    assert given_options(p, args, ("label_values", "iters", "fit")) == ["--label-values"]  # 5 is the default
    with pytest.raises(ValueError, match="nope"):
        given_options(p, args, ("nope",))


def test_find_checkpoint_names_the_folder_a_monai_backbones_runs_are_in(tmp_path):
    from evaluation.runner import find_checkpoint

    root = tmp_path / "checkpoint"
    for exp in ("a", "b"):  # main.py stores monai:SegResNet's runs under monai_SegResNet
        _save_ckpt(root / "tiny" / "monai_SegResNet" / "epo1" / exp / "best_model.pth", "unet", "none", TINY_2D)
    with pytest.raises(ValueError, match=r"tiny/monai_SegResNet: 2 runs match"):
        find_checkpoint(root, "tiny", "monai:SegResNet")
    with pytest.raises(FileNotFoundError, match=r"tiny/monai:Other or .*tiny/monai_Other or "):
        find_checkpoint(root, "tiny", "monai:Other")
