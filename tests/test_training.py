"""Losses, datasets, transforms, trainer and main.py on the tiny HDF5 dataset."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import main as main_cli
from dataloaders.datasets import PatchDataSet, SliceDataSet, VolumeDataSet
from dataloaders.transforms import resize_2d, rot_flip
from losses import make_loss, poly_scheduler, soft_cldice_loss, soft_dice_loss, soft_skeleton
from networks.checkpoint import load_model
from trainer import TrainConfig, TrainingError, backward_step, train

TINY_2D = {"base_channels": 4, "depth": 2}


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors on a shared machine: thread start-up and contention dominate (20x slower)
    n, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    # train(deterministic=True) switches deterministic algorithms on process-wide
    torch.use_deterministic_algorithms(det)


def cfg_for(ds, tmp_path: Path, **kw) -> TrainConfig:
    base = dict(dataset=ds.dataset, root_path=str(ds.root_path), list_dir=str(ds.list_dir),
                output_root=str(tmp_path / "ckpt"), model_kwargs=TINY_2D, img_size=(32, 32),
                patch_size=(16, 16, 8), patches_per_epoch=4, batch_size=2, num_workers=0, max_epochs=1,
                val_batch_size=16)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- losses


def test_dice_loss_worked_example():
    # p = sigmoid(+-30) is 1 / 0 to float precision: |P| = 2, |T| = 3, |P & T| = 1
    logits = torch.tensor([30.0, 30.0, -30.0, -30.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)
    expected = 1 - (2 * 1 + 1) / (2 + 3 + 1)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_bce_and_sum_of_terms():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert make_loss("bce")(logits, target).item() == pytest.approx(bce.item(), rel=1e-5)
    both = make_loss("bce+dice")(logits, target).item()
    assert both == pytest.approx(bce.item() + soft_dice_loss(logits, target).item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        make_loss("focal")


def test_soft_skeleton_of_a_bar_is_its_centre_row():
    # a binary bar 3 rows thick: the soft skeleton is the morphological one, the middle row
    x = torch.zeros(1, 1, 9, 15)
    x[0, 0, 3:6, 2:13] = 1
    skel = soft_skeleton(x, iterations=3)[0, 0]
    assert skel[4, 4:11].min() == 1
    assert skel[[3, 5]].sum() == 0 and skel[:3].sum() == 0 and skel[6:].sum() == 0
    # 3-D: a tube of 3 x 3 cross-section along D keeps its axis
    v = torch.zeros(1, 1, 7, 7, 12)
    v[0, 0, 2:5, 2:5, 1:11] = 1
    sk = soft_skeleton(v, iterations=3)[0, 0]
    assert sk[3, 3, 3:9].min() == 1 and sk.sum() <= sk[3, 3].sum() + 4


def test_cldice_perfect_empty_and_finite_gradients():
    t = torch.zeros(1, 1, 8, 8, 8)
    t[0, 0, 3:5, 3:5, 1:7] = 1
    perfect = (t * 2 - 1) * 30
    assert soft_cldice_loss(perfect, t).item() == pytest.approx(0.0, abs=1e-4)
    # empty truth and empty prediction: skeletons are empty; the smoothed ratios stay 1
    empty = torch.zeros_like(t)
    logits = torch.full_like(t, -30.0, requires_grad=True)
    loss = soft_cldice_loss(logits, empty)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(logits.grad).all()
    # a prediction missing the vessel costs more than one that finds it
    assert soft_cldice_loss(torch.full_like(t, -30.0), t) > soft_cldice_loss(perfect * 0.1, t)


def test_poly_schedule_matches_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = poly_scheduler(opt, 10, 0.9)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01 * (1 - k / 10) ** 0.9 for k in range(10)])


def test_clip_grad_bounds_the_first_sgd_step():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    before = w.detach().clone()
    loss = (1000 * w).sum()  # gradient norm 1000 * sqrt(50)
    backward_step(torch.nn.ParameterList([w]), loss, opt, torch.amp.GradScaler("cuda", enabled=False), clip_grad=0.5)
    # first SGD step: w -= lr * g, with g rescaled to norm 0.5
    assert torch.linalg.norm(w.detach() - before).item() == pytest.approx(0.1 * 0.5, rel=1e-4)


# --------------------------------------------------------------------------- data


def test_slice_dataset_offline_input_is_gated_image(tiny_dataset):
    ds = SliceDataSet(tiny_dataset.paths, "offline", img_size=(32, 32), augment=False)
    name = ds.names[5]
    with h5py.File(tiny_dataset.paths.slice(name), "r") as f:
        g, s, lab = f["image"][()], f["salience"][()], f["label"][()]
    item = ds[5]
    np.testing.assert_allclose(item["input"].numpy(), g[None] * (1 + s), rtol=1e-6)
    np.testing.assert_array_equal(item["label"][0].numpy(), lab)
    assert SliceDataSet(tiny_dataset.paths, "none", img_size=(48, 40))[5]["input"].shape == (1, 48, 40)


def test_slice_salience_falls_back_to_volume_file(tiny_dataset):
    # the authors' slice files may carry no salience: take it from vol_salience
    ds = SliceDataSet(tiny_dataset.paths, "offline", augment=False)
    name = ds.names[3]
    path = tiny_dataset.paths.slice(name)
    with h5py.File(path, "a") as f:
        s = f["salience"][()]
        del f["salience"]
    np.testing.assert_allclose(ds[3]["input"].numpy(), ds[3]["image"].numpy() * (1 + s), rtol=1e-6)


def test_reads_authors_files_without_attributes(tiny_dataset):
    # the authors' released volumes: 'image' and 'label' only, label stored as float
    path = tiny_dataset.paths.volume("case0001")
    with h5py.File(path, "r") as f:
        image, label = f["image"][()], f["label"][()]
    path.unlink()
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label.astype(np.float32)
    vols = VolumeDataSet(tiny_dataset.paths, "train", "none")
    assert vols[0].spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(vols[0].label, label)


def test_rot_flip_swaps_coronal_and_sagittal_on_quarter_turns():
    img = np.arange(6 * 6 * 2, dtype=np.float32).reshape(6, 6, 2)
    sal = np.stack([np.full(img.shape, c, np.float32) for c in (0, 1, 2)])
    for seed in range(12):
        rng = np.random.default_rng(seed)
        k = int(np.random.default_rng(seed).integers(0, 4))
        i2, l2, s2 = rot_flip(img, img > 20, sal, rng)
        assert [float(s2[c].mean()) for c in range(3)] == ([0, 2, 1] if k % 2 else [0, 1, 2])
        np.testing.assert_array_equal(l2, i2 > 20)  # label moved with the image


def test_resize_2d_identity_and_label_resized_like_the_image():
    x = np.random.default_rng(0).random((3, 10, 10)).astype(np.float32)
    lab = (x[0] > 0.5).astype(np.uint8)
    x2, l2 = resize_2d(x, lab, (10, 10))
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(l2, lab)
    x3, l3 = resize_2d(x, lab, (20, 20))
    assert x3.shape == (3, 20, 20) and l3.dtype == np.float32 and 0 <= l3.min() and l3.max() <= 1
    # one geometry: the label is resized exactly as an image channel holding it would be
    x4, _ = resize_2d(np.concatenate([x, lab[None].astype(np.float32)]), lab, (20, 20))
    np.testing.assert_allclose(l3, x4[3], atol=1e-6)


def test_patch_dataset_centres_a_third_on_vessels(tiny_dataset):
    vols = VolumeDataSet(tiny_dataset.paths, "train", "offline")
    patches = PatchDataSet(vols, (8, 8, 4), samples_per_epoch=30, augment=False)
    fg = [i for i in range(30) if patches.is_foreground_item(i)]
    assert len(fg) == 10
    for i in fg:
        item = patches[i]
        assert item["input"].shape == (3, 8, 8, 4)
        assert item["label"][0, 4, 4, 2] == 1  # the patch centre is a vessel voxel
    # volumes smaller than the patch are zero-padded
    big = PatchDataSet(vols, (40, 8, 16), samples_per_epoch=2)
    assert big[0]["input"].shape == (3, 40, 8, 16)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("backbone", ["unet", "unet3d"])
@pytest.mark.parametrize("salience", ["none", "offline", "e2e"])
def test_two_iterations_each_mode(tiny_dataset, tmp_path, backbone, salience):
    cfg = cfg_for(tiny_dataset, tmp_path, backbone=backbone, salience=salience, max_iterations=2)
    result = train(cfg)
    assert result.iteration == 2 and len(result.losses) == 2 and np.isfinite(result.losses).all()
    assert result.stopped_by == "max_iterations"
    run = cfg.run_dir()
    assert run == tmp_path / "ckpt" / "tiny" / backbone / "epo1_bs2_lr0.01" / salience
    assert {"last.pth", "best_model.pth", "config.json", "train.log"} <= {p.name for p in run.iterdir()}
    assert any((run / "tensorboard").iterdir())
    # the checkpoint rebuilds its model with no flags
    model, ckpt = load_model(run / "last.pth")
    assert ckpt["salience"] == salience and ckpt["model_name"] == backbone and ckpt["iteration"] == 2
    shape = (1, 3 if salience == "offline" else 1) + ((32, 32) if backbone == "unet" else (16, 16, 8))
    assert model(torch.rand(shape)).shape == (1, 1) + shape[2:]
    assert json.loads((run / "config.json").read_text())["salience"] == salience


def test_time_budget_stops_and_saves(tiny_dataset, tmp_path):
    # a zero-minute budget: the first iteration ends the run, which still validates and saves
    result = train(cfg_for(tiny_dataset, tmp_path, max_minutes=0.0, max_epochs=5))
    assert result.stopped_by == "max_minutes" and result.iteration == 1 and result.epoch == 0
    _, ckpt = load_model(result.run_dir / "last.pth")
    assert ckpt["iteration"] == 1 and ckpt["best_metric"] == result.best_metric >= 0


def test_resume_gives_the_same_weights(tiny_dataset, tmp_path):
    full = train(cfg_for(tiny_dataset, tmp_path, max_epochs=2, exp="full", patches_per_epoch=4))
    part1 = train(cfg_for(tiny_dataset, tmp_path, max_epochs=2, exp="split", stop_after_epochs=1))
    assert part1.stopped_by == "stop_after_epochs" and part1.epoch == 1
    part2 = train(cfg_for(tiny_dataset, tmp_path, max_epochs=2, exp="split", resume=True))
    assert part2.epoch == 2 and part2.iteration == full.iteration
    # deterministic CPU runs: the same losses step by step, the same final weights
    assert part1.losses + part2.losses == full.losses
    a = torch.load(full.run_dir / "last.pth", weights_only=True)
    b = torch.load(part2.run_dir / "last.pth", weights_only=True)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_kw: dict, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # each rank gets its own output root: only rank 0's may exist afterwards
    cfg = TrainConfig(**{**cfg_kw, "output_root": f"{out}/rank{rank}"})
    result = train(cfg)
    Path(out, f"done{rank}.json").write_text(json.dumps({"iteration": result.iteration, "losses": result.losses,
                                                             "best": result.best_metric, "main": result.main}))


def test_ddp_two_cpu_processes(tiny_dataset, tmp_path):
    cfg = cfg_for(tiny_dataset, tmp_path, max_iterations=2)
    kw = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    # fork: the children inherit the imported modules (spawn would re-import torch and MONAI twice)
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), kw, str(tmp_path)), nprocs=2,
                                          join=True, start_method="fork")
    r0 = json.loads((tmp_path / "done0.json").read_text())
    r1 = json.loads((tmp_path / "done1.json").read_text())
    assert r0["iteration"] == r1["iteration"] == 2
    assert r0["losses"] == r1["losses"]  # all-reduced: both ranks log the same mean loss
    assert r0["best"] == r1["best"] >= 0 and r0["main"] and not r1["main"]
    assert (tmp_path / "rank0" / "tiny" / "unet").is_dir()
    assert not (tmp_path / "rank1").exists()
    _, ckpt = load_model(next((tmp_path / "rank0").rglob("last.pth")))
    assert ckpt["config"]["batch_size"] == 2 and ckpt["iteration"] == 2


# --------------------------------------------------------------------------- bad input


def _cli(ds, tmp_path, *extra):
    return main_cli.main(["--dataset", ds.dataset, "--root_path", str(ds.root_path), "--list_dir", str(ds.list_dir),
                          "--output_root", str(tmp_path / "ckpt"), "--model_kwargs", json.dumps(TINY_2D),
                          "--img_size", "32", "32", "--num_workers", "0", "--max_iterations", "1", *extra])


def _errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if " ERROR " in ln]


def test_cli_bad_inputs_exit_nonzero_with_one_line(tiny_dataset, tmp_path, capsys):
    cases = [
        (["--backbone", "nosuchnet"], "unknown backbone 'nosuchnet'; valid: attention_unet"),
        (["--dataset", "nosuchdata"], "nosuchdata: dataset folder not found"),
        (["--list_dir", str(tmp_path)], "list folder for dataset 'tiny' not found"),
        (["--loss", "focal"], "unknown loss 'focal'"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert _cli(tiny_dataset, tmp_path, *extra) == 1
        errors = _errors(capsys)
        assert len(errors) == 1 and message in errors[0], (extra, errors)
    os.remove(tiny_dataset.paths.list_file("slice_train"))
    assert _cli(tiny_dataset, tmp_path) == 1
    assert "slice_train.txt: list file not found" in _errors(capsys)[0]


def test_offline_without_salience_says_run_salience_generation(tiny_dataset_no_salience, tmp_path, capsys):
    assert _cli(tiny_dataset_no_salience, tmp_path, "--salience", "offline") == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "run salience_generation.py --dataset tiny" in errors[0]
    assert not (tmp_path / "ckpt").exists()  # nothing half-written


def test_existing_run_needs_resume_or_overwrite_and_channels_must_match(tiny_dataset, tmp_path):
    cfg = cfg_for(tiny_dataset, tmp_path, max_iterations=1, exp="x")
    train(cfg)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(cfg)
    other = cfg_for(tiny_dataset, tmp_path, max_iterations=2, exp="x", salience="none", resume=True)
    with pytest.raises(ValueError, match="channel mismatch: checkpoint takes 3 channels"):
        train(other)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path):
    # one iteration per epoch (36 slices, batch 36); epoch 1 is clean, then the data turn NaN
    cfg = cfg_for(tiny_dataset, tmp_path, exp="nan", salience="none", batch_size=36, max_epochs=2,
                  stop_after_epochs=1)
    first = train(cfg)
    assert first.iteration == 1
    good = torch.load(first.run_dir / "last.pth", weights_only=True)["state_dict"]
    for name in SliceDataSet(tiny_dataset.paths, "none").names:
        with h5py.File(tiny_dataset.paths.slice(name), "a") as f:
            f["image"][0, 0] = np.nan
    cfg.resume, cfg.stop_after_epochs = True, None
    with pytest.raises(TrainingError, match=r"loss is nan at iteration 2 \(epoch 2\).*last good checkpoint kept"):
        train(cfg)
    kept = torch.load(first.run_dir / "last.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(good[k], kept[k]) for k in good)


def test_img_size_takes_two_integers():
    args = main_cli.build_parser().parse_args(["--dataset", "x", "--img_size", "128", "96"])
    assert args.img_size == [128, 96]
    with pytest.raises(SystemExit):
        main_cli.build_parser().parse_args(["--dataset", "x", "--img_size", "128"])


def test_rot_flip_keeps_non_square_patches_whole():
    """A (32, 48, 16) patch never turns a quarter (that swaps h and w); square ones still do."""
    img = np.random.default_rng(0).random((32, 48, 16)).astype(np.float32)
    sal = np.stack([img, img + 1, img + 2])
    turned = 0
    for seed in range(24):
        i2, l2, s2 = rot_flip(img, img > 0.5, sal, np.random.default_rng(seed))
        assert i2.shape == img.shape and s2.shape == sal.shape
        np.testing.assert_array_equal(l2, i2 > 0.5)
        np.testing.assert_array_equal(s2[0], i2)  # channels not swapped without a quarter turn
        square, _, _ = rot_flip(img[:32, :32], img[:32, :32] > 0.5, None, np.random.default_rng(seed))
        turned += not any(np.array_equal(square, f) for f in (img[:32, :32], img[:32, :32][::-1], img[:32, :32][:, ::-1],
                                                              img[:32, :32][::-1, ::-1]))
    assert turned > 0


def test_patch_dataset_non_square_patches_batch(tiny_dataset):
    from torch.utils.data import default_collate

    vols = VolumeDataSet(tiny_dataset.paths, "train", "offline")
    patches = PatchDataSet(vols, (16, 24, 8), samples_per_epoch=40, augment=True, seed=3)
    batch = default_collate([patches[i] for i in range(len(patches))])  # crashed: "stack expects ..."
    assert batch["input"].shape == (40, 3, 16, 24, 8) and batch["label"].shape == (40, 1, 16, 24, 8)


def test_slice_dataset_target_spacing_resamples_then_pads(tiny_dataset):
    """tiny cases are 32 x 32 at 0.8 mm: at 1.6 mm they are 16 x 16, zero-padded centred to 20 x 20;
    image, salience and label share the geometry (the label is the soft resample of the mask)."""
    from utils.h5io import read_volume

    ds = SliceDataSet(tiny_dataset.paths, "offline", img_size=(20, 20), target_spacing=1.6, augment=False)
    item = ds[5]
    assert item["input"].shape == (3, 20, 20) and item["label"].shape == (1, 20, 20)
    vol = read_volume(tiny_dataset.paths.volume("case0001"))
    z = int(ds.names[5].split("_slice")[1])
    x, lab = resize_2d(vol.image[None, :, :, z], vol.label[:, :, z], (16, 16))
    np.testing.assert_allclose(item["image"][0, 2:18, 2:18].numpy(), x[0], atol=1e-6)
    np.testing.assert_allclose(item["label"][0, 2:18, 2:18].numpy(), lab, atol=1e-6)
    assert float(item["image"][0, :2].abs().max()) == 0.0
    cropped = SliceDataSet(tiny_dataset.paths, "none", img_size=(8, 12), target_spacing=1.6, augment=False)
    assert cropped[0]["input"].shape == (1, 8, 12)


def test_target_spacing_run_records_it_and_validates_resampled(tiny_dataset, tmp_path):
    result = train(cfg_for(tiny_dataset, tmp_path, img_size=(16, 16), target_spacing=1.6, max_iterations=1,
                           exp="mm"))
    _, ckpt = load_model(result.run_dir / "best_model.pth")
    assert ckpt["target_spacing"] == 1.6 and ckpt["mm_per_pixel"] == 1.6 and ckpt["img_size"] == [16, 16]
    pix = train(cfg_for(tiny_dataset, tmp_path, img_size=(16, 16), max_iterations=1, exp="px"))
    _, ckpt = load_model(pix.run_dir / "last.pth")
    # tiny cases: 32 px at 0.8 mm, resized to 16 px: the model saw 1.6 mm per pixel
    assert ckpt["target_spacing"] is None and ckpt["mm_per_pixel"] == pytest.approx(1.6)
    with pytest.raises(ValueError, match="--target_spacing must be a positive"):
        cfg_for(tiny_dataset, tmp_path, target_spacing=0.0)


def test_init_from_copies_backbone_and_head(tiny_dataset, tmp_path):
    from networks.checkpoint import init_from_checkpoint
    from networks.e2e import build_segmenter

    src = train(cfg_for(tiny_dataset, tmp_path, salience="e2e", max_iterations=1, exp="src")).run_dir / "last.pth"
    stored = torch.load(src, weights_only=True)["state_dict"]
    torch.manual_seed(99)
    e2e = build_segmenter("unet", "e2e", 1, TINY_2D)
    init_from_checkpoint(e2e, src, model_name="unet", salience="e2e")
    for k, v in e2e.state_dict().items():
        assert torch.equal(v, stored[k]), k  # backbone and head
    plain = build_segmenter("unet", "none", 1, TINY_2D)  # a 2-D e2e backbone also takes 1 channel
    init_from_checkpoint(plain, src, model_name="unet", salience="none")
    for k, v in plain.state_dict().items():
        assert torch.equal(v, stored["backbone." + k]), k
    # the run itself starts from those weights: with lr ~ 0, its first checkpoint holds them
    run = train(cfg_for(tiny_dataset, tmp_path, salience="none", max_iterations=1, exp="dst", init_from=str(src),
                        base_lr=1e-30, weight_decay=0.0, momentum=0.0))
    got = torch.load(run.run_dir / "last.pth", weights_only=True)["state_dict"]
    conv = [k for k in got if k.endswith("weight") and got[k].ndim == 4]
    assert conv and all(torch.allclose(got[k], stored["backbone." + k]) for k in conv)


def test_init_from_other_architecture_fails_with_one_line(tiny_dataset, tmp_path, capsys):
    src = train(cfg_for(tiny_dataset, tmp_path, salience="none", max_iterations=1, exp="src")).run_dir / "last.pth"
    capsys.readouterr()
    # offline takes 3 input channels, the source backbone 1
    assert _cli(tiny_dataset, tmp_path, "--salience", "offline", "--init_from", str(src), "--exp", "x") == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and f"{src}: --init_from architecture differs" in errors[0], errors
    assert _cli(tiny_dataset, tmp_path, "--salience", "none", "--init_from", str(src), "--exp", "y",
                "--model_kwargs", json.dumps({"base_channels": 8, "depth": 2})) == 1
    assert "shape mismatches" in _errors(capsys)[0]
    assert _cli(tiny_dataset, tmp_path, "--init_from", str(tmp_path / "nope.pth"), "--exp", "z") == 1
    assert "nope.pth" in _errors(capsys)[0]
