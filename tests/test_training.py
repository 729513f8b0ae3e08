"""Losses, datasets, transforms, trainer and main.py on the tiny HDF5 dataset."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import main as main_cli
from dataloaders.datasets import PatchDataSet, SliceDataSet, VolumeDataSet
from dataloaders.inputs import BIAS_SMOOTH_MM, BLUR_MIN_SIGMA, ELASTIC_SMOOTH_MM
from dataloaders.transforms import (BLUR_PROB, DOMAIN_NOISE, DOMAIN_SCALE, DOMAIN_SHIFT, elastic_field, elastic_planes,
                                   gaussian_blur, intensity_domain, resize_2d, rot_flip, rotate_planes, shade_planes,
                                   smooth_field)
from losses import make_loss, poly_scheduler, soft_cldice_loss, soft_dice_loss, soft_skeleton
from networks.checkpoint import load_model
import trainer
from trainer import RunBatchSampler, TrainConfig, TrainingError, backward_step, train
from utils import threads

TINY_2D = {"base_channels": 4, "depth": 2}


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors on a shared machine: thread start-up and contention dominate (20x slower)
    det = torch.are_deterministic_algorithms_enabled()
    with threads.one_thread():
        yield
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


def test_intensity_domain_is_an_affine_map_about_the_tissue_median_plus_noise():
    rng0 = np.random.default_rng(0)
    image = np.zeros((64, 64), np.float32)
    image[8:56, 8:56] = rng0.uniform(0.2, 0.5, (48, 48))  # tissue; the rest is air (0)
    centre = float(np.median(image[image > 0]))
    seen_noise = seen_clean = False
    for seed in range(40):
        out = intensity_domain(image, np.random.default_rng(seed))
        assert out.dtype == np.float32 and out.shape == image.shape
        assert (out[image == 0] == 0).all() and out.min() >= 0 and out.max() <= 1
        t = image > 0
        # least-squares fit out = a * (image - centre) + b over the tissue
        a, b = np.polyfit(image[t] - centre, out[t], 1)
        resid = out[t] - (a * (image[t] - centre) + b)
        assert DOMAIN_SCALE[0] - 0.02 <= a <= DOMAIN_SCALE[1] + 0.02
        assert abs(b - centre) <= DOMAIN_SHIFT + 0.01
        assert resid.std() <= DOMAIN_NOISE + 0.002
        seen_noise |= resid.std() > 1e-3
        seen_clean |= resid.std() < 1e-5
    assert seen_noise and seen_clean  # noise is added about half the time
    np.testing.assert_array_equal(intensity_domain(image, np.random.default_rng(3)),
                                  intensity_domain(image, np.random.default_rng(3)))
    assert not intensity_domain(np.zeros((4, 4), np.float32), np.random.default_rng(0)).any()


def test_domain_aug_changes_the_image_channel_only_in_training_items(tiny_dataset):
    plain = SliceDataSet(tiny_dataset.paths, "offline", img_size=(32, 32), augment=False)
    dom = SliceDataSet(tiny_dataset.paths, "offline", img_size=(32, 32), augment=False, domain=True, cache=True)
    assert {e[0] for e in dom._cache} == {"stored"}  # the augmentation runs per item, after the cache
    a, b = plain[(0, 5)], dom[(0, 5)]
    np.testing.assert_array_equal(a["label"].numpy(), b["label"].numpy())
    assert not np.allclose(a["image"].numpy(), b["image"].numpy(), atol=1e-3)
    with h5py.File(tiny_dataset.paths.slice(dom.names[5]), "r") as f:
        sal = f["salience"][()]
    # the input is built from the augmented image (G (1 + S), the salience as stored), to float16 rounding
    np.testing.assert_allclose(b["input"].numpy(), b["image"].numpy() * (1 + sal), atol=2e-3)


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


def test_an_empty_split_is_refused_with_what_to_do(tiny_dataset):
    tiny_dataset.paths.list_file("vol_val").write_text("")
    with pytest.raises(ValueError, match=r"vol_val.txt: list is empty \(preprocess.py gives fewer than 3 patients"):
        VolumeDataSet(tiny_dataset.paths, "val", "none")


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
    # record the (epoch, index) keys this rank's loader asks for (num_workers 0: in this process)
    seen = []
    get = SliceDataSet.__getitem__

    def recording(self, key):
        if isinstance(key, tuple):
            seen.append(list(key))
        return get(self, key)

    SliceDataSet.__getitem__ = recording
    # each rank gets its own output root: only rank 0's may exist afterwards
    cfg = TrainConfig(**{**cfg_kw, "output_root": f"{out}/rank{rank}"})
    result = train(cfg)
    torch.save(result.model.state_dict(), Path(out, f"weights{rank}.pt"))
    Path(out, f"done{rank}.json").write_text(json.dumps({"iteration": result.iteration, "losses": result.losses,
                                                             "best": result.best_metric, "main": result.main,
                                                             "seen": seen}))


def test_ddp_two_cpu_processes(tiny_dataset, tmp_path):
    cfg = cfg_for(tiny_dataset, tmp_path, max_iterations=2)
    kw = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    # fork: the children inherit the imported modules (spawn would re-import torch and MONAI twice)
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), kw, str(tmp_path)), nprocs=2,
                                          join=True, start_method="fork")
    r0 = json.loads((tmp_path / "done0.json").read_text())
    r1 = json.loads((tmp_path / "done1.json").read_text())
    assert r0["iteration"] == r1["iteration"] == 2
    # each rank read 2 batches of 2 items of epoch 0, and no item twice across ranks
    seen0, seen1 = {tuple(k) for k in r0["seen"]}, {tuple(k) for k in r1["seen"]}
    assert len(r0["seen"]) == len(seen0) == 4 and len(r1["seen"]) == len(seen1) == 4
    assert not seen0 & seen1 and {e for e, _ in seen0 | seen1} == {0}
    # gradients were averaged: both ranks end with the same weights, moved away from the start
    w0, w1 = torch.load(tmp_path / "weights0.pt"), torch.load(tmp_path / "weights1.pt")
    torch.manual_seed(cfg.seed)
    init = trainer.build_segmenter("unet", "offline", 1, TINY_2D).state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w0[k], init[k]) for k in w0 if k.endswith("weight"))
    assert r0["losses"] == r1["losses"]  # all-reduced: both ranks log the same mean loss
    assert r0["best"] == r1["best"] >= 0 and r0["main"] and not r1["main"]
    assert (tmp_path / "rank0" / "tiny" / "unet").is_dir()
    assert not (tmp_path / "rank1").exists()
    _, ckpt = load_model(next((tmp_path / "rank0").rglob("last.pth")))
    assert ckpt["config"]["batch_size"] == 2 and ckpt["iteration"] == 2


class _Crash(Exception):
    pass


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def _interrupted_then_resumed(ds, tmp_path, monkeypatch, exp: str, crash_after: int, resume_kw=None, **kw):
    """Train ``exp`` until ``crash_after`` steps are done (the next step raises), then resume it
    (with ``resume_kw`` on top of ``kw``); returns the resumed run's TrainResult."""
    step = trainer._train_step

    def crash(run, batch):
        if run.iteration == crash_after:
            raise _Crash
        return step(run, batch)

    monkeypatch.setattr(trainer, "_train_step", crash)
    with pytest.raises(_Crash):
        train(cfg_for(ds, tmp_path, exp=exp, **kw))
    monkeypatch.setattr(trainer, "_train_step", step)
    return train(cfg_for(ds, tmp_path, exp=exp, resume=True, **{**kw, **(resume_kw or {})}))


def test_resume_mid_epoch_is_bit_exact_with_workers(tiny_dataset, tmp_path, monkeypatch):
    # 36 slices, batch 8: 5 batches an epoch; last.pth is written at the validation of iteration 3
    kw = dict(max_epochs=2, batch_size=8, val_every=3)
    full = train(cfg_for(tiny_dataset, tmp_path, exp="full", num_workers=2, **kw))
    part2 = _interrupted_then_resumed(tiny_dataset, tmp_path, monkeypatch, "split", 4, **kw)
    # the resumed run (no workers) sees exactly the batches and augmentations the full one
    # (two persistent workers) saw after iteration 3
    assert full.iteration == part2.iteration == 10
    assert part2.losses == full.losses[3:]
    _assert_same_weights(full.model, part2.model)


def test_resume_mid_epoch_is_exact_for_a_backbone_with_dropout(tiny_dataset, tmp_path, monkeypatch):
    """unet3d has dropout (0.3): a run resumed mid-epoch must draw the masks the uninterrupted
    run drew. 8 patches of batch 2 an epoch: last.pth at the validation of iteration 3, crash at 5."""
    kw = dict(backbone="unet3d", model_kwargs={"base_channels": 4, "depth": 2}, salience="none",
              patches_per_epoch=8, max_epochs=2, val_every=3)
    full = train(cfg_for(tiny_dataset, tmp_path, exp="full3d", **kw))
    assert any(isinstance(m, torch.nn.Dropout) for m in full.model.modules())
    part2 = _interrupted_then_resumed(tiny_dataset, tmp_path, monkeypatch, "split3d", 4, **kw)
    assert full.iteration == part2.iteration == 8
    assert part2.losses == full.losses[3:]
    _assert_same_weights(full.model, part2.model)


def test_resume_from_an_epochs_last_batch_trains_the_next_epoch(tiny_dataset, tmp_path, monkeypatch):
    """36 slices of batch 8: 5 batches an epoch, validated (last.pth written) at iteration 5, the
    epoch's last batch. Resumed with --stop_after_epochs 1, the run trains epoch 2's 5 batches:
    it does not count the finished epoch again with no batch left."""
    kw = dict(max_epochs=2, batch_size=8, val_every=5)
    full = train(cfg_for(tiny_dataset, tmp_path, exp="full", **kw))
    part2 = _interrupted_then_resumed(tiny_dataset, tmp_path, monkeypatch, "split", 5, {"stop_after_epochs": 1}, **kw)
    assert part2.iteration == full.iteration == 10 and part2.epoch == 2
    assert part2.losses == full.losses[5:]


def test_step_seeds_differ_across_seeds_and_iterations():
    seeds = {trainer.step_seed(s, i) for s in range(4) for i in range(5000)}
    assert len(seeds) == 4 * 5000


def test_run_batch_sampler_epochs_skip_and_shards():
    s = RunBatchSampler(10, 4, seed=3, start_epoch=1, end_epoch=3, skip_batches=1)
    batches = list(s)
    assert len(batches) == len(s) == 5 and [len(b) for b in batches] == [4, 2, 4, 4, 2]
    assert {e for b in batches[:2] for e, _ in b} == {1} and {e for b in batches[2:] for e, _ in b} == {2}
    assert sorted(i for b in batches[2:] for _, i in b) == list(range(10))
    # the skipped batch is the first batch of epoch 1's order
    assert [i for b in batches[:2] for _, i in b] == s.epoch_order(1)[4:]
    # DDP: two ranks split every epoch into disjoint halves
    shards = [RunBatchSampler(10, 4, 3, 0, 1, 0, rank=r, world_size=2, distributed=True) for r in (0, 1)]
    items = [[i for b in sh for _, i in b] for sh in shards]
    assert not set(items[0]) & set(items[1]) and set(items[0]) | set(items[1]) == set(range(10))


def test_cache_data_serves_slices_from_memory(tiny_dataset):
    disk = SliceDataSet(tiny_dataset.paths, "offline", img_size=(32, 32))
    cached = SliceDataSet(tiny_dataset.paths, "offline", img_size=(32, 32), cache=True)
    for name in disk.names:
        tiny_dataset.paths.slice(name).unlink()  # the cache must not read the files again
    for key in [(0, 3), (1, 3), (2, 17)]:
        item = cached[key]
        assert item["input"].shape == (3, 32, 32) and item["label"].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="unreadable slice file"):
        disk[(0, 3)]


@pytest.mark.parametrize("salience,size", [("offline", (32, 32)), ("offline", (48, 48)), ("none", (48, 48)),
                                           ("offline", (40, 24))])
def test_cached_items_equal_uncached_to_float16_precision(tiny_dataset, salience, size):
    # (32, 32) and (48, 48): kept at the training size (rot/flip commutes with the resize);
    # (40, 24): kept at the stored size. The augmentation draws are the same either way.
    disk = SliceDataSet(tiny_dataset.paths, salience, img_size=size)
    cached = SliceDataSet(tiny_dataset.paths, salience, img_size=size, cache=True)
    assert {e[0] for e in cached._cache} == {"stored" if size[0] != size[1] else "resized"}
    for key in [(0, 3), (1, 3), (2, 17), (5, 30), (7, 8)]:
        a, b = cached[key], disk[key]
        assert a["input"].shape == b["input"].shape == (3 if salience == "offline" else 1,) + size
        np.testing.assert_allclose(a["input"].numpy(), b["input"].numpy(), atol=2e-3)
        np.testing.assert_allclose(a["image"].numpy(), b["image"].numpy(), atol=2e-3)
        # resize comes before rot/flip in both paths: the soft labels agree to float16 rounding
        np.testing.assert_allclose(a["label"].numpy(), b["label"].numpy(), atol=2e-3)


def test_main_help_imports_no_torch():
    code = "import sys, main; main.build_parser(); print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == ["False", "False"]


# --------------------------------------------------------------------------- bad input


def _cli_args(ds, tmp_path, *extra) -> list[str]:
    return ["--dataset", ds.dataset, "--root_path", str(ds.root_path), "--list_dir", str(ds.list_dir),
            "--output_root", str(tmp_path / "ckpt"), "--model_kwargs", json.dumps(TINY_2D),
            "--img_size", "32", "32", "--num_workers", "0", "--max_iterations", "1", *extra]


def _cli(ds, tmp_path, *extra):
    return main_cli.main(_cli_args(ds, tmp_path, *extra))


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


def test_config_differences_name_what_changed_and_skip_runtime_options():
    cfg = TrainConfig(dataset="d", max_iterations=400, base_lr=0.003)
    saved = cfg.to_json()
    assert cfg.differences(saved) == []
    assert TrainConfig(dataset="d", max_iterations=400, base_lr=0.01).differences(saved) == [
        "base_lr: 0.01 here vs 0.003"]
    # how a run executes is not what it learns
    assert TrainConfig(dataset="d", max_iterations=400, base_lr=0.003, num_workers=7, device="cpu",
                       cache_data=True).differences(saved) == []
    # a run saved before an option existed was trained with its default
    older = {k: v for k, v in saved.items() if k != "blur_aug"}
    assert cfg.differences(older) == []
    assert TrainConfig(dataset="d", max_iterations=400, base_lr=0.003, blur_aug=1.0).differences(older) == [
        "blur_aug: 1.0 here vs 0.0"]


def _cfg_of(ds, tmp_path, *extra) -> TrainConfig:
    """The TrainConfig main.py builds from _cli's arguments plus ``extra``."""
    args = vars(main_cli.build_parser().parse_args(_cli_args(ds, tmp_path, *extra)))
    for flag in ("print_run_dir", "reuse"):
        args.pop(flag)
    return TrainConfig(**args)


def test_reuse_keeps_finished_same_options_retrains_early_stops_and_refuses_other_options(tiny_dataset, tmp_path,
                                                                                          capsys):
    base = ("--max_iterations", "2", "--exp", "r")
    cfg = _cfg_of(tiny_dataset, tmp_path, *base)
    assert main_cli.check_reuse(cfg)[0] == main_cli.NO_RUN  # nothing yet
    assert not (tmp_path / "ckpt" / "tiny").exists()  # checking writes nothing
    assert _cli(tiny_dataset, tmp_path, *base, "--reuse") == 0  # trains
    last = cfg.run_dir() / "last.pth"
    assert last.is_file()
    assert main_cli.check_reuse(cfg)[0] == main_cli.REUSE
    # the same run, had its backbone come from a plug-in edited since: trained again, not reused
    ckpt = torch.load(last, weights_only=True)
    torch.save({**ckpt, "backbone_source": {"file": "networks/plugins/x.py", "sha256": "0" * 64}}, last)
    status, message = main_cli.check_reuse(cfg)
    assert status == main_cli.NO_RUN and "another version of backbone unet's code" in message
    torch.save(ckpt, last)
    trained = last.stat().st_mtime_ns
    assert _cli(tiny_dataset, tmp_path, *base, "--reuse") == 0
    assert last.stat().st_mtime_ns == trained  # kept, not trained again
    # a time or per-job epoch limit does not change a finished model: still reused
    assert main_cli.check_reuse(_cfg_of(tiny_dataset, tmp_path, *base, "--max_minutes", "30",
                                        "--stop_after_epochs", "1"))[0] == main_cli.REUSE
    # other options: an error naming the file and the option, status 2, the run untouched
    for extra, named in ((("--blur_aug", "1"), "blur_aug: 1.0 here vs 0.0"), (("--max_iterations", "4"),
                                                                            "max_iterations: 4 here vs 2")):
        assert main_cli.check_reuse(_cfg_of(tiny_dataset, tmp_path, *base, *extra))[0] == main_cli.OTHER_OPTIONS
        capsys.readouterr()
        assert _cli(tiny_dataset, tmp_path, *base, *extra, "--reuse") == main_cli.OTHER_OPTIONS
        errors = _errors(capsys)
        assert len(errors) == 1 and f"r/last.pth: trained with other options ({named})" in errors[0]
        assert last.stat().st_mtime_ns == trained
    # a run interrupted before its last iteration is not reused: it is trained again
    ckpt = torch.load(last, weights_only=True)
    ckpt["iteration"], ckpt["epoch"] = 1, 0
    torch.save(ckpt, last)
    assert main_cli.check_reuse(cfg)[0] == main_cli.NO_RUN
    assert _cli(tiny_dataset, tmp_path, *base, "--reuse") == 0
    assert torch.load(last, weights_only=True)["iteration"] == 2
    # a finished run on data made again since (its manifest changed) is trained again
    from utils import manifests

    doc = manifests.salience_manifest(kind="bank", parameters=None, weights_sha256="ab" * 32, weights_path=None,
                                      normalisation="fixed", dataset=None,
                                      cases={c: [3, 32, 32, 12] for c in sum(tiny_dataset.splits.values(), [])})
    manifests.write_salience_manifest(tiny_dataset.paths, doc)
    status, message = main_cli.check_reuse(cfg)
    assert status == main_cli.NO_RUN and "trained on other data (salience manifest missing then)" in message
    assert _cli(tiny_dataset, tmp_path, *base, "--reuse") == 0
    assert main_cli.check_reuse(cfg)[0] == main_cli.REUSE  # the new run knows its data
    # a run that went to the end of its epochs counts as finished without max_iterations
    cfg = cfg_for(tiny_dataset, tmp_path, max_epochs=1, exp="e")
    train(cfg)
    assert main_cli.check_reuse(cfg)[0] == main_cli.REUSE
    (cfg.run_dir() / "last.pth").write_bytes(b"not a checkpoint")
    status, message = main_cli.check_reuse(cfg)
    assert status == main_cli.OTHER_OPTIONS and "last.pth" in message


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
    # resuming may move where the run stops, not what it learns; config.json stays the run's
    saved = (cfg.run_dir() / "config.json").read_text()
    for kw, named in ((dict(weight_decay=0.1), "weight_decay: 0.1 here vs 0.0001"), (dict(blur_aug=1.0), "blur_aug: 1.0 here vs 0.0")):
        with pytest.raises(ValueError, match=f"last.pth: cannot resume with other options \\({named}\\)"):
            train(cfg_for(tiny_dataset, tmp_path, max_iterations=2, exp="x", resume=True, **kw))
        assert (cfg.run_dir() / "config.json").read_text() == saved
    assert train(cfg_for(tiny_dataset, tmp_path, max_iterations=2, exp="x", resume=True, num_workers=0)).iteration == 2


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


def test_scale_aug_zooms_each_training_slice_within_its_range(tiny_dataset):
    """tiny slices are 32 x 32 at 0.8 mm, 16 x 16 at 1.6 mm; every pixel of the image is
    non-zero, so the rows the zoomed plane fills inside the 40 x 40 pad give its size:
    16 x zoom with zoom in [1/1.5, 1.5], i.e. 11-24 rows. The soft label's mass (its area in
    pixels) must scale with the zoom squared. The zoom does not wait for --augment (rot/flip):
    the liver model trains with flips off and zooms on, and a zoom that needed the flips was
    silently off there."""
    kw = dict(img_size=(40, 40), target_spacing=1.6)
    plain = SliceDataSet(tiny_dataset.paths, "none", augment=False, **kw)
    zoomed = SliceDataSet(tiny_dataset.paths, "none", augment=False, scale_aug=0.5, **kw)
    idx = 5
    base = plain[idx]
    assert int((base["image"][0].abs().sum(1) > 0).sum()) == 16
    mass0 = float(base["label"].sum())
    assert mass0 > 5
    sizes = []
    for epoch in range(24):
        item = zoomed[(epoch, idx)]
        rows = int((item["image"][0].abs().sum(1) > 0).sum())
        assert 11 <= rows <= 24
        assert float(item["label"].sum()) == pytest.approx(mass0 * (rows / 16) ** 2, rel=0.2)
        sizes.append(rows)
    assert min(sizes) < 14 and max(sizes) > 19  # both ways, not just one
    with pytest.raises(ValueError, match="--scale_aug must be in"):
        SliceDataSet(tiny_dataset.paths, "none", scale_aug=1.0, **kw)
    with pytest.raises(ValueError, match="--scale_aug must be in"):
        TrainConfig(dataset="tiny", scale_aug=-0.1)


def _principal_angle(mask: np.ndarray) -> float:
    """Angle (degrees, in [0, 180)) of the principal axis of a soft mask (H, W), from its second moments."""
    r, c = np.nonzero(mask > 0.5)
    w = mask[r, c]
    r, c = r - np.average(r, weights=w), c - np.average(c, weights=w)
    rr, cc, rc = np.average(r * r, weights=w), np.average(c * c, weights=w), np.average(r * c, weights=w)
    return float(np.degrees(0.5 * np.arctan2(2 * rc, rr - cc)) % 180)


def test_rotate_planes_worked_answers():
    x = np.zeros((2, 21, 21), np.float32)
    x[:, 10, 15] = 1.0  # five pixels right of the centre
    lab = x[:1].copy()
    a, b = rotate_planes(x, lab, 90.0)
    # counter-clockwise as displayed (row 0 at the top): right of the centre goes to above it
    assert [tuple(p) for p in np.argwhere(a[0] > 0.5)] == [(5, 10)] and np.array_equal(a[0], a[1])
    assert [tuple(p) for p in np.argwhere(b[0] > 0.5)] == [(5, 10)]
    # a soft disc about the centre keeps its area (to the interpolation) and stays in [0, 1]
    rr, cc = np.mgrid[:41, :41]
    disc = np.clip(7.5 - np.hypot(rr - 20, cc - 20), 0, 1).astype(np.float32)[None]
    _, d = rotate_planes(disc, disc, 23.0)
    assert d.min() >= 0 and d.max() <= 1 and float(d.sum()) == pytest.approx(float(disc.sum()), rel=0.01)
    same = rotate_planes(x, lab, 0.0)
    assert same[0] is x and same[1] is lab
    with pytest.raises(ValueError, match="rotate_planes needs"):
        rotate_planes(x, lab[:, :20], 10.0)


def test_rotate_aug_turns_each_training_slice_within_its_range(tiny_dataset):
    """tiny slices carry a vessel along a 45 degree diagonal: with --rotate_aug 30 its axis turns
    by at most 30 degrees, both ways over the epochs, and the vessel keeps its area; --augment 0
    means no quarter turn or flip comes on top."""
    plain = SliceDataSet(tiny_dataset.paths, "none", img_size=(32, 32), augment=False)
    turned = SliceDataSet(tiny_dataset.paths, "none", img_size=(32, 32), augment=False, rotate_aug=30)
    idx = 5
    base = plain[idx]["label"][0].numpy()
    a0, mass0 = _principal_angle(base), float(base.sum())
    assert abs(a0 - 135) < 10 or abs(a0 - 45) < 10
    turns = []
    for epoch in range(24):
        lab = turned[(epoch, idx)]["label"][0].numpy()
        turn = (_principal_angle(lab) - a0 + 90) % 180 - 90
        assert abs(turn) <= 32
        assert float(lab.sum()) == pytest.approx(mass0, rel=0.1)
        turns.append(turn)
    assert min(turns) < -10 and max(turns) > 10
    with pytest.raises(ValueError, match="--rotate_aug must be in"):
        SliceDataSet(tiny_dataset.paths, "none", img_size=(32, 32), rotate_aug=50)
    with pytest.raises(ValueError, match="--rotate_aug must be in"):
        TrainConfig(dataset="tiny", rotate_aug=-1)


def test_elastic_field_is_smooth_noise_of_the_asked_peak():
    """White noise smoothed by a Gaussian of sigma s has the autocorrelation exp(-lag^2 / (4 s^2)):
    0.78 at a lag of s, 0.37 at 2 s; its largest component is the asked peak, and one seed
    draws one field."""
    field = elastic_field((640, 640), 3.0, 8.0, np.random.default_rng(0))
    assert field.shape == (2, 640, 640) and float(np.abs(field).max()) == pytest.approx(3.0)
    inner = field[:, 32:-32, 32:-32]
    for lag, want in ((8, np.exp(-0.25)), (16, np.exp(-1.0))):
        shifted = field[:, 32 + lag:640 - 32 + lag, 32:-32]
        r = float(np.corrcoef(inner.ravel(), shifted.ravel())[0, 1])
        assert r == pytest.approx(want, abs=0.05)
    assert np.array_equal(field, elastic_field((640, 640), 3.0, 8.0, np.random.default_rng(0)))
    assert not elastic_field((16, 16), 0.0, 4.0, np.random.default_rng(1)).any()
    with pytest.raises(ValueError, match="elastic_field needs"):
        elastic_field((16, 16, 4), 1.0, 4.0, np.random.default_rng(0))


def test_elastic_planes_worked_answers():
    """A linear ramp warped by a field reads back the field (bilinear sampling is exact on it);
    a constant field of +2 rows shifts the plane up by 2, zero below; the label moves with the
    image and stays in [0, 1]."""
    rows, cols = np.mgrid[:24, :20].astype(np.float32)
    x = np.stack([cols, rows])
    field = elastic_field((24, 20), 1.5, 5.0, np.random.default_rng(3))
    warped, lab = elastic_planes(x, x[:1] / 20, field)
    inner = (slice(3, -3), slice(3, -3))
    assert np.allclose(warped[0][inner], (cols + field[1])[inner], atol=1e-4)
    assert np.allclose(warped[1][inner], (rows + field[0])[inner], atol=1e-4)
    assert np.allclose(lab[0][inner], warped[0][inner] / 20, atol=1e-5) and lab.min() >= 0 and lab.max() <= 1
    up = np.zeros((2, 24, 20))
    up[0] = 2.0
    shifted, _ = elastic_planes(x, x[:1] / 20, up)
    assert np.array_equal(shifted[1][:22], rows[2:]) and not shifted[:, 22:].any()
    with pytest.raises(ValueError, match="elastic_planes needs"):
        elastic_planes(x, x[:1, :20], field)


def test_elastic_aug_bends_each_training_slice_by_at_most_its_millimetres(tiny_dataset):
    """--elastic_aug E at 1.6 mm per pixel moves every label pixel by at most E / 1.6 pixels: the
    bent label lies within that distance of the straight one, differs from it over the epochs,
    and keeps its area (per-item draws and refusals: test_millimetre_augmentations_...)."""
    from scipy import ndimage
    kw = dict(img_size=(32, 32), augment=False, target_spacing=1.6)
    plain = SliceDataSet(tiny_dataset.paths, "none", **kw)
    bent = SliceDataSet(tiny_dataset.paths, "none", elastic_aug=4.0, **kw)
    idx = 5
    base = plain[idx]["label"][0].numpy() > 0.5
    reach = ndimage.distance_transform_edt(~base)
    moved = 0
    for epoch in range(12):
        lab = bent[(epoch, idx)]["label"][0].numpy()
        assert float(reach[lab > 0.5].max()) <= 4.0 / 1.6 + 1.0  # + a pixel for the soft label's threshold
        assert float(lab.sum()) == pytest.approx(float(plain[idx]["label"].sum()), rel=0.2)
        moved += not np.array_equal(lab > 0.5, base)
    assert moved >= 8


def test_shade_planes_adds_the_shading_to_tissue_only():
    """Tissue pixels get the shading, clipped to [0, 1]; pixels at 0 (below the HU window) stay 0;
    every plane gets the same shading."""
    x = np.array([[[0.0, 0.5], [0.95, 0.02]], [[0.3, 0.0], [0.1, 0.6]]], dtype=np.float32)
    shading = np.array([[0.1, -0.2], [0.1, -0.05]], dtype=np.float32)
    out = shade_planes(x, shading)
    want = np.array([[[0.0, 0.3], [1.0, 0.0]], [[0.4, 0.0], [0.2, 0.55]]], dtype=np.float32)
    assert out.dtype == np.float32 and np.allclose(out, want)
    with pytest.raises(ValueError, match="shade_planes needs"):
        shade_planes(x, shading[:1])


def test_bias_aug_shades_images_by_at_most_its_hounsfield_units(tiny_dataset, monkeypatch):
    """--bias_aug B changes each training image by at most B HU (B / 400 of the window), smoothly
    (neighbouring pixels' changes differ by a tenth of the peak at most), leaves the label, the
    salience and the pixels below the window alone, and shades the context slices alike."""
    kw = dict(img_size=(32, 32), augment=False, target_spacing=1.6)
    plain = SliceDataSet(tiny_dataset.paths, "none", **kw)
    shaded = SliceDataSet(tiny_dataset.paths, "none", bias_aug=60.0, **kw)
    idx = 5
    base = plain[idx]
    peaks = []
    for epoch in range(8):
        item = shaded[(epoch, idx)]
        diff = (item["image"] - base["image"])[0].numpy()
        assert torch.equal(item["label"], base["label"])
        assert not diff[base["image"][0].numpy() == 0].any()
        peak = float(np.abs(diff).max())
        assert peak <= 60.0 / 400 + 1e-6
        inside = (base["image"][0].numpy() > 0.16) & (base["image"][0].numpy() < 0.84)  # never clipped
        step = np.abs(np.diff(np.where(inside, diff, np.nan), axis=1))
        if np.isfinite(step).any() and peak > 0:
            # a 25 mm shading barely changes over 1.6 mm (a 1-pixel one changed by 0.3 of its peak)
            assert float(np.nanmax(step)) <= 0.1 * peak
        peaks.append(peak)
    assert max(peaks) > 0.5 * 60.0 / 400 and len(set(np.round(peaks, 6))) > 4
    # offline salience: the maps are not shaded (input / image = 1 + salience alike); the context
    # slices get the image's shading
    off = dict(kw, context=1)
    p_item = SliceDataSet(tiny_dataset.paths, "offline", **off)[(2, idx)]
    s_item = SliceDataSet(tiny_dataset.paths, "offline", bias_aug=60.0, **off)[(2, idx)]
    img_p, img_s = p_item["image"][0], s_item["image"][0]
    body = (img_p > 0.16) & (img_p < 0.84)
    assert p_item["input"].shape[0] == 5 and float((img_s - img_p).abs().max()) > 0
    assert torch.allclose(p_item["input"][:3][:, body] / img_p[body], s_item["input"][:3][:, body] / img_s[body],
                          atol=1e-4)
    for c in (3, 4):
        m = body & (p_item["input"][c] > 0.16) & (p_item["input"][c] < 0.84)
        assert m.any() and torch.allclose((s_item["input"][c] - p_item["input"][c])[m], (img_s - img_p)[m], atol=1e-5)
    # the smoothness is in mm: 25 mm at 1.6 mm per pixel
    seen = []
    monkeypatch.setattr("dataloaders.datasets.smooth_field", lambda shape, n, peak, px, rng: seen.append(px) or
                        smooth_field(shape, n, peak, px, rng))
    shaded[(0, idx)]
    assert seen == [pytest.approx(BIAS_SMOOTH_MM / 1.6)]
    monkeypatch.undo()


def test_millimetre_augmentations_follow_the_zoom(tiny_dataset, monkeypatch):
    """With --scale_aug, a plane zoomed by f is target_spacing / f mm per pixel: the bends' and
    the shading's smoothness (25 mm) and the bends' peak (U(0, E) mm) are converted with that
    zoomed pixel size, not the unzoomed one (which would bend a zoomed-in slice by too few mm)."""
    import dataloaders.datasets as ds
    from utils.h5io import parse_slice_name
    seen = {"size": [], "elastic": [], "bias": []}
    real_resize, real_elastic, real_smooth = ds.resize_2d, ds.elastic_field, ds.smooth_field
    monkeypatch.setattr(ds, "resize_2d", lambda x, lab, size: seen["size"].append(tuple(size)) or
                        real_resize(x, lab, size))
    monkeypatch.setattr(ds, "elastic_field", lambda shape, peak, px, rng: seen["elastic"].append((peak, px)) or
                        real_elastic(shape, peak, px, rng))
    monkeypatch.setattr(ds, "smooth_field", lambda shape, n, peak, px, rng: seen["bias"].append(px) or
                        real_smooth(shape, n, peak, px, rng))
    data = SliceDataSet(tiny_dataset.paths, "none", img_size=(32, 32), augment=False, target_spacing=1.6,
                        scale_aug=0.5, elastic_aug=6.0, bias_aug=40.0)
    idx = 5
    with h5py.File(data.paths.slice(data.names[idx]), "r") as f:
        h, w = f["image"].shape
    spacing = data.spacings[parse_slice_name(data.names[idx])[0]]
    base = (h * float(spacing[0]) / 1.6, w * float(spacing[1]) / 1.6)  # the unzoomed plane, px
    zooms = []
    for epoch in range(10):
        data[(epoch, idx)]
    assert len(seen["size"]) == len(seen["elastic"]) == len(seen["bias"]) == 10
    for size, (peak, px), bias_px in zip(seen["size"], seen["elastic"], seen["bias"]):
        # the zoomed size was rounded to whole pixels (|base * zoom - size| <= 0.5), so the zoom
        # read back from it is off by at most 0.5 / size of itself
        zoom, slack = size[0] / base[0], 0.5 / size[0] + 1e-9
        assert px == pytest.approx(ELASTIC_SMOOTH_MM * zoom / 1.6, rel=slack)
        assert bias_px == pytest.approx(BIAS_SMOOTH_MM * zoom / 1.6, rel=slack)
        assert 0 <= peak <= 6.0 * zoom / 1.6 * (1 + slack)
        zooms.append(zoom)
    assert min(zooms) < 0.85 and max(zooms) > 1.15  # both ways, beyond the rounding slack


@pytest.mark.parametrize("option, value, field, atol, too_big, message", [
    ("elastic_aug", 4.0, "label", 0.02, 30, r"--elastic_aug must be in \[0, 25\] mm, got 30.0"),
    ("bias_aug", 60.0, "image", 2e-3, 150, r"--bias_aug must be in \[0, 100\] HU, got 150.0"),
])
def test_millimetre_augmentations_draw_per_item_need_a_spacing_and_train(tiny_dataset, tmp_path, option, value, field,
                                                                        atol, too_big, message):
    """--elastic_aug and --bias_aug (fields whose smoothness is in mm): an item's draw is its (seed,
    epoch, index)'s, the same from the cache and another with another seed; refused without
    --target_spacing and out of range; a run with it trains."""
    kw = dict(img_size=(32, 32), augment=False, target_spacing=1.6, **{option: value})
    drawn = SliceDataSet(tiny_dataset.paths, "none", **kw)[(3, 5)][field].numpy()
    cached = SliceDataSet(tiny_dataset.paths, "none", cache=True, **kw)[(3, 5)][field].numpy()
    other = SliceDataSet(tiny_dataset.paths, "none", seed=1, **kw)[(3, 5)][field].numpy()
    assert np.allclose(cached, drawn, atol=atol) and not np.allclose(other, drawn, atol=atol)
    with pytest.raises(ValueError, match=f"--{option} needs --target_spacing"):
        SliceDataSet(tiny_dataset.paths, "none", img_size=(32, 32), **{option: value})
    with pytest.raises(ValueError, match=message):
        TrainConfig(dataset="tiny", **{option: too_big})
    result = train(cfg_for(tiny_dataset, tmp_path, img_size=(16, 16), target_spacing=1.6, max_iterations=2,
                           exp=option, **{option: value}))
    assert result.iteration == 2 and np.isfinite(result.losses).all()


def test_scale_aug_run_and_3d_refusal(tiny_dataset, tmp_path):
    result = train(cfg_for(tiny_dataset, tmp_path, img_size=(16, 16), target_spacing=1.6, scale_aug=0.25,
                           max_iterations=2, exp="zoom"))
    assert result.iteration == 2 and np.isfinite(result.losses).all()
    with pytest.raises(ValueError, match="--scale_aug, --rotate_aug, --elastic_aug and --bias_aug are for 2-D"):
        train(cfg_for(tiny_dataset, tmp_path, backbone="unet3d", scale_aug=0.25, max_iterations=1, exp="z3"))
    with pytest.raises(ValueError, match="--scale_aug, --rotate_aug, --elastic_aug and --bias_aug are for 2-D"):
        train(cfg_for(tiny_dataset, tmp_path, backbone="unet3d", rotate_aug=10, max_iterations=1, exp="r3"))
    with pytest.raises(ValueError, match="--scale_aug, --rotate_aug, --elastic_aug and --bias_aug are for 2-D"):
        train(cfg_for(tiny_dataset, tmp_path, backbone="unet3d", elastic_aug=5, max_iterations=1, exp="e3"))
    with pytest.raises(ValueError, match="--scale_aug, --rotate_aug, --elastic_aug and --bias_aug are for 2-D"):
        train(cfg_for(tiny_dataset, tmp_path, backbone="unet3d", bias_aug=20, max_iterations=1, exp="b3"))
    with pytest.raises(ValueError, match="--target_spacing is for 2-D backbones; unet3d_bilinear trains on 3-D"):
        train(cfg_for(tiny_dataset, tmp_path, backbone="unet3d_bilinear", target_spacing=1.6, max_iterations=1,
                      exp="mm3"))


@pytest.mark.parametrize("kw,message", [
    (dict(val_overlap=1.0), "--val_overlap must be in [0, 1), got 1.0"),
    (dict(val_overlap=-0.1), "--val_overlap must be in [0, 1), got -0.1"),
    (dict(min_component_mm3=-5.0), "--min_component_mm3 must be >= 0 mm^3, got -5.0"),
    (dict(fg_fraction=1.5), "--fg_fraction must be in [0, 1], got 1.5"),
])
def test_validation_and_post_processing_options_are_checked_before_training(kw, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(dataset="tiny", **kw)
    assert str(e.value) == message


def test_a_run_that_max_epochs_stops_before_max_iterations_says_so_at_the_start(tiny_dataset, tmp_path):
    """4 patches per epoch at batch 2 is 2 iterations per epoch: one epoch ends the run at 2,
    and --max_iterations 5 would silently not be reached; the run's own train.log says so
    before the first epoch. A run that reaches its iterations gets no warning."""
    result = train(cfg_for(tiny_dataset, tmp_path, backbone="unet3d", model_kwargs={"base_channels": 4, "depth": 2},
                           max_iterations=5, exp="short"))
    assert result.iteration == 2
    lines = (result.run_dir / "train.log").read_text().splitlines()
    said = [i for i, line in enumerate(lines) if "raise --max_epochs" in line]
    assert len(said) == 1
    assert lines[said[0]].endswith("WARNING trainer: --max_epochs 1 x 2 iterations per epoch stops this run at 2 "
                                   "iterations, before --max_iterations 5: raise --max_epochs to train them all")
    assert said[0] < min(i for i, line in enumerate(lines) if "epoch 1/1 done" in line)
    enough = train(cfg_for(tiny_dataset, tmp_path, backbone="unet3d", model_kwargs={"base_channels": 4, "depth": 2},
                           max_iterations=2, exp="enough"))
    assert "raise --max_epochs" not in (enough.run_dir / "train.log").read_text()


def test_gaussian_blur_spreads_a_line_by_the_drawn_sigma():
    """A one-pixel line across a plane, blurred with sigma s, has a cross profile whose mass
    is 1 and whose variance is s^2 (the Gaussian's); the draw is replayed from the same seed.
    About half the draws leave the image as it is; on a patch (H, W, D) nothing crosses D."""
    image = np.zeros((64, 48), np.float32)
    image[:, 20] = 1.0
    cols = np.arange(48)
    blurred = 0
    for seed in range(40):
        out = gaussian_blur(image, np.random.default_rng(seed), 1.5)
        assert out.dtype == np.float32 and out.shape == image.shape
        replay = np.random.default_rng(seed)
        if replay.random() >= BLUR_PROB:
            np.testing.assert_array_equal(out, image)
            continue
        blurred += 1
        sigma = replay.uniform(BLUR_MIN_SIGMA, 1.5)
        profile = out[32]
        assert profile.sum() == pytest.approx(1.0, abs=1e-5)
        mean = float((profile * cols).sum())
        assert mean == pytest.approx(20.0, abs=1e-5)
        np.testing.assert_allclose(profile[:20][::-1], profile[21:41], atol=1e-6)  # symmetric about the line
        if sigma >= 0.6:  # a sampled Gaussian narrower than that is no longer s^2 wide
            var = float((profile * (cols - mean) ** 2).sum())
            assert var == pytest.approx(sigma ** 2, rel=0.01)
    assert 10 <= blurred <= 30
    # off: no draw taken, nothing changed
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(gaussian_blur(image, rng, 0.0), image)
    assert rng.random() == np.random.default_rng(0).random()
    patch = np.zeros((16, 16, 5), np.float32)
    patch[8, 8, 2] = 1.0
    for seed in range(6):
        out = gaussian_blur(patch, np.random.default_rng(seed), 2.0)
        assert not out[:, :, [0, 1, 3, 4]].any() and out.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="gaussian_blur needs"):
        gaussian_blur(np.zeros(5, np.float32), np.random.default_rng(0), 1.0)


def test_blur_aug_blurs_the_image_channel_of_training_items_only(tiny_dataset):
    """--blur_aug changes the image of about half the training items (the same draws each
    time) and never the label, with or without --augment's rot/flip."""
    kw = dict(img_size=(16, 16), target_spacing=1.6)
    plain = SliceDataSet(tiny_dataset.paths, "none", augment=True, **kw)
    blur = SliceDataSet(tiny_dataset.paths, "none", augment=True, blur_aug=1.5, **kw)
    changed = 0
    for epoch in range(20):
        a, b = plain[(epoch, 5)], blur[(epoch, 5)]
        np.testing.assert_array_equal(a["label"].numpy(), b["label"].numpy())
        same = np.array_equal(a["image"].numpy(), b["image"].numpy())
        if not same:
            changed += 1
            # a blur lowers the spread of the intensities
            assert float(b["image"].std()) < float(a["image"].std())
    assert 4 <= changed <= 16
    np.testing.assert_array_equal(blur[(0, 5)]["image"].numpy(), blur[(0, 5)]["image"].numpy())
    no_flip = SliceDataSet(tiny_dataset.paths, "none", augment=False, blur_aug=1.5, **kw)
    ref = SliceDataSet(tiny_dataset.paths, "none", augment=False, **kw)
    changed = sum(not np.array_equal(no_flip[(e, 5)]["image"].numpy(), ref[(e, 5)]["image"].numpy())
                  for e in range(20))
    assert 4 <= changed <= 16
    with pytest.raises(ValueError, match="--blur_aug must be 0"):
        TrainConfig(dataset="tiny", blur_aug=0.1)
    with pytest.raises(ValueError, match="--blur_aug must be 0"):
        SliceDataSet(tiny_dataset.paths, "none", blur_aug=-1.0, **kw)


def test_blur_aug_runs_2d_and_3d_and_is_saved_with_the_run(tiny_dataset, tmp_path):
    for backbone, exp in (("unet", "blur2d"), ("unet3d", "blur3d")):
        result = train(cfg_for(tiny_dataset, tmp_path, backbone=backbone, blur_aug=1.0, max_iterations=2, exp=exp))
        assert result.iteration == 2 and np.isfinite(result.losses).all()
        saved = json.loads((result.run_dir / "config.json").read_text())
        assert saved["blur_aug"] == 1.0


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


def test_freeze_bn_keeps_the_starting_statistics_and_trains_the_rest(tiny_dataset, tmp_path):
    src = train(cfg_for(tiny_dataset, tmp_path, salience="none", max_iterations=1, exp="src")).run_dir / "last.pth"
    stored = torch.load(src, weights_only=True)["state_dict"]
    stats = [k for k in stored if k.endswith(("running_mean", "running_var"))]
    assert stats
    # validation after every step: it must hand the model back with the statistics still frozen
    kw = dict(salience="none", max_iterations=3, val_every=1, init_from=str(src), base_lr=0.01)
    frozen = torch.load(train(cfg_for(tiny_dataset, tmp_path, exp="frozen", freeze_bn=True, **kw)).run_dir
                        / "last.pth", weights_only=True)["state_dict"]
    free = torch.load(train(cfg_for(tiny_dataset, tmp_path, exp="free", **kw)).run_dir / "last.pth",
                      weights_only=True)["state_dict"]
    assert all(torch.equal(frozen[k], stored[k]) for k in stats)
    assert not all(torch.equal(free[k], stored[k]) for k in stats)  # without the flag they move
    # the BatchNorm affine weights and the convolutions still learn
    affine = [k[: -len("running_mean")] + "weight" for k in stats if k.endswith("running_mean")]
    assert not all(torch.equal(frozen[k], stored[k]) for k in affine)
    conv = [k for k in frozen if k.endswith("weight") and frozen[k].ndim == 4]
    assert not all(torch.equal(frozen[k], stored[k]) for k in conv)


def test_freeze_norm_statistics_freezes_only_the_norms_until_train_mode():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 1, 1),
                              torch.nn.BatchNorm2d(1))
    assert trainer.freeze_norm_statistics(net) == 2
    before = net[1].running_mean.clone()
    net(torch.randn(2, 1, 8, 8) + 5)
    assert torch.equal(net[1].running_mean, before) and net[0].training  # only the norms left train mode
    net.train()  # as validation does when it hands the model back
    net(torch.randn(2, 1, 8, 8) + 5)
    assert not torch.equal(net[1].running_mean, before)
    assert trainer.freeze_norm_statistics(torch.nn.Conv2d(1, 1, 1)) == 0


def test_head_and_an_e2e_init_from_are_refused_together(tiny_dataset, tmp_path):
    """An e2e --init_from brings its salience head, which replaces --head's: both given, --head
    would be a no-op recorded as the run's salience provenance. A non-e2e source keeps --head."""
    from networks.salience import default_head_path

    src = train(cfg_for(tiny_dataset, tmp_path, salience="e2e", max_iterations=1, exp="src")).run_dir / "last.pth"
    # without --head the head starts untrained, and the run's log says so
    assert "--salience e2e without --head: the salience head starts untrained" in \
        (src.parent / "train.log").read_text()
    with pytest.raises(ValueError, match=r"--head .*: the salience head comes from --init_from .*not both"):
        train(cfg_for(tiny_dataset, tmp_path, salience="e2e", max_iterations=1, exp="both", init_from=str(src),
                      head=str(default_head_path())))
    assert not (tmp_path / "ckpt" / "both").exists() and not list((tmp_path / "ckpt").rglob("both/last.pth"))
    plain = train(cfg_for(tiny_dataset, tmp_path, salience="none", max_iterations=1, exp="plain")).run_dir / "last.pth"
    run = train(cfg_for(tiny_dataset, tmp_path, salience="e2e", max_iterations=1, exp="mixed", init_from=str(plain),
                        head=str(default_head_path())))
    assert run.iteration == 1
    assert "without --head" not in (run.run_dir / "train.log").read_text()
    # an e2e run from a non-e2e one gets no head from it: untrained, and said so
    fresh = train(cfg_for(tiny_dataset, tmp_path, salience="e2e", max_iterations=1, exp="from_plain",
                          init_from=str(plain)))
    assert "the salience head starts untrained" in (fresh.run_dir / "train.log").read_text()
    from_e2e = train(cfg_for(tiny_dataset, tmp_path, salience="e2e", max_iterations=1, exp="from_e2e",
                             init_from=str(src)))
    assert "starts untrained" not in (from_e2e.run_dir / "train.log").read_text()


def test_freeze_bn_needs_init_from(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="--freeze_bn keeps the statistics of the --init_from weights"):
        cfg_for(tiny_dataset, tmp_path, freeze_bn=True)


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


def test_loss_monitor_names_the_first_bad_iteration(tmp_path):
    env = trainer.Env(torch.device("cpu"))
    mon = trainer.LossMonitor(env, None, tmp_path / "last.pth", 0.0)
    for it, value in [(1, 0.5), (2, 0.25)]:
        mon.add(it, 0, 0.01, torch.tensor(value))
    assert mon.flush() == 0.25 and mon.losses == [0.5, 0.25] and mon.flush() is None
    for it, value in [(3, 0.2), (4, float("inf")), (5, float("nan"))]:
        mon.add(it, 1, 0.01, torch.tensor(value))
    with pytest.raises(TrainingError, match=r"loss is inf at iteration 4 \(epoch 2\).*\(none yet\)"):
        mon.flush()


def test_epoch_end_validation_keeps_within_the_time_fraction():
    from types import SimpleNamespace

    def due(last_val, trained, fraction=0.1):
        run = SimpleNamespace(last_val_seconds=last_val, trained_since_val=trained,
                              cfg=SimpleNamespace(val_fraction=fraction), env=trainer.Env(torch.device("cpu")))
        return trainer._epoch_end_validation_due(run)

    assert due(None, 0.0)  # the first epoch end always validates (and measures the cost)
    # a 10 s validation is due once 90 s of training passed: 10 / (90 + 10) = 10%
    assert not due(10.0, 89.0) and due(10.0, 90.0)
    assert due(10.0, 10.0, fraction=0.5) and not due(10.0, 9.0, fraction=0.5)


def test_stitch_device_uses_the_gpu_only_when_the_volume_fits(monkeypatch):
    from inference import stitch_device

    assert stitch_device((512, 512, 200), 3, "cpu") == torch.device("cpu")
    # CUDA-only branch, exercised with a stand-in for the free-memory query
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    # 512 x 512 x 200 voxels x 4 bytes x (3 input channels + 3) = 1.26 GB <= half of 8 GB
    assert stitch_device((512, 512, 200), 3, "cuda:0") == torch.device("cuda:0")
    assert stitch_device((512, 512, 1000), 3, "cuda:0") == torch.device("cpu")  # 6.3 GB > 4 GB


# --------------------------------------------------------------------------- resume: exact or refused


def test_resume_of_a_finished_run_says_complete(tiny_dataset, tmp_path, capsys):
    cfg = cfg_for(tiny_dataset, tmp_path, max_iterations=3)
    first = train(cfg)
    last = first.run_dir / "last.pth"
    stamp = last.stat().st_mtime_ns
    again = train(cfg_for(tiny_dataset, tmp_path, max_iterations=3, resume=True))
    assert again.stopped_by == "complete" and again.iteration == 3 and again.losses == []
    assert last.stat().st_mtime_ns == stamp and torch.load(last, weights_only=True)["iteration"] == 3
    args = ["--dataset", tiny_dataset.dataset, "--root_path", str(tiny_dataset.root_path), "--list_dir",
            str(tiny_dataset.list_dir), "--output_root", str(tmp_path / "ckpt"), "--model_kwargs",
            json.dumps(TINY_2D), "--img_size", "32", "32", "--batch_size", "2", "--num_workers", "0",
            "--max_epochs", "1", "--val_batch_size", "16", "--max_iterations", "3", "--patch_size", "16", "16", "8",
            "--patches_per_epoch", "4", "--resume"]
    assert main_cli.main(args) == 0
    assert "run complete (iteration 3" in capsys.readouterr().out
    assert torch.load(last, weights_only=True)["iteration"] == 3


def test_resume_with_more_iterations_recomputes_the_schedule(tiny_dataset, tmp_path, monkeypatch):
    train(cfg_for(tiny_dataset, tmp_path, max_iterations=3, base_lr=0.01))
    from utils.logging_setup import setup_logging
    setup_logging()  # a new process: the first run's train.log is no longer written to
    lrs = []
    step = trainer._train_step

    def recording(run, batch):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        return step(run, batch)

    monkeypatch.setattr(trainer, "_train_step", recording)
    more = train(cfg_for(tiny_dataset, tmp_path, max_iterations=6, base_lr=0.01, resume=True))
    assert more.iteration == 6 and len(lrs) == 3
    # iterations 3, 4, 5 follow the poly schedule of the new horizon, 6 iterations
    assert lrs == pytest.approx([0.01 * (1 - i / 6) ** 0.9 for i in (3, 4, 5)], rel=1e-6)
    saved = torch.load(more.run_dir / "last.pth", weights_only=True)["config"]
    assert saved["lr_horizon_iterations"] == 6 and saved["world_size"] == 1
    # the change is in the run's own log (it was said before train.log opened, so only on the console)
    log_text = (more.run_dir / "train.log").read_text()
    assert log_text.count("the poly schedule's horizon changes from 3 to 6 iterations") == 1
    assert f"learning rate {0.01 * 0.5 ** 0.9:.3g} at iteration 3, decaying to 0 at 6" in log_text


def test_resume_on_another_world_size_or_batch_size_is_refused(tiny_dataset, tmp_path, capsys):
    first = train(cfg_for(tiny_dataset, tmp_path, max_iterations=4))
    last = first.run_dir / "last.pth"
    ckpt = torch.load(last, weights_only=True)
    ckpt["config"]["world_size"] = 2
    ckpt["iteration"] = 2
    torch.save(ckpt, last)
    with pytest.raises(ValueError, match=r"trained on 2 process\(es\), resumed on 1.*--nproc_per_node 2"):
        train(cfg_for(tiny_dataset, tmp_path, max_iterations=4, resume=True))
    # another batch size is another run (its folder names it): nothing to resume there, in one line
    args = ["--dataset", tiny_dataset.dataset, "--root_path", str(tiny_dataset.root_path), "--list_dir",
            str(tiny_dataset.list_dir), "--output_root", str(tmp_path / "ckpt"), "--model_kwargs",
            json.dumps(TINY_2D), "--img_size", "32", "32", "--batch_size", "4", "--num_workers", "0",
            "--max_epochs", "1", "--max_iterations", "4", "--resume"]
    capsys.readouterr()
    assert main_cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to resume" in err[0] and "epo1_bs4_lr0.01" in err[0]


@pytest.mark.parametrize("bad, message", [
    (dict(val_batch_size=0), "--val_batch_size"),
    (dict(patches_per_epoch=0), "--patches_per_epoch"),
    (dict(max_iterations=0), "--max_iterations must be >= 1"),
    (dict(stop_after_epochs=0), "--stop_after_epochs must be >= 1"),
    (dict(val_every=-3), "must be >= 0, got -3"),
    (dict(save_minutes=-1), "must be >= 0, got 0, -1"),
    (dict(clip_grad=-1), "--clip_grad must be >= 0"),
    (dict(loss="bce+dcie"), "unknown loss 'bce\\+dcie'"),
])
def test_bad_training_options_fail_before_any_data_is_read(bad, message):
    """Each of these used to be accepted: 0 iterations read as no limit, a zero validation batch
    crashed after the first epoch, a misspelt loss after the data was cached."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(dataset="no_such_dataset", **bad)


def test_amp_uses_fp16_on_a_gpu_without_bf16_kernels(monkeypatch):
    """A T4 or V100 can hold bf16 tensors, so torch.cuda.is_bf16_supported() says True by default
    (emulation), but it has no bf16 kernels: such a GPU must train in fp16 with the scaler."""
    def t4_bf16(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", t4_bf16)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert trainer.setup_env(TrainConfig(dataset="x")).amp_dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert trainer.setup_env(TrainConfig(dataset="x")).amp_dtype == torch.bfloat16
    # torch before 2.4 has no including_emulation argument (and never counted emulation)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert trainer.setup_env(TrainConfig(dataset="x")).amp_dtype == torch.float16
    TrainConfig(dataset="x", save_minutes=0)  # a checkpoint at every epoch end: still allowed


def test_reuse_keeps_a_run_stopped_at_its_last_batch(tiny_dataset, tmp_path):
    """A run of one epoch, no --max_iterations, whose last checkpoint was written at the epoch's last
    batch before the epoch was counted (a --max_minutes stop there) has trained everything: reused,
    not trained again from scratch."""
    cfg = cfg_for(tiny_dataset, tmp_path, exp="laststep")
    done = train(cfg)
    last = cfg.run_dir() / "last.pth"
    assert main_cli.check_reuse(cfg)[0] == main_cli.REUSE
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == done.iteration
    ckpt["epoch"] = 0
    torch.save(ckpt, last)
    assert main_cli.check_reuse(cfg)[0] == main_cli.REUSE
    ckpt["iteration"] -= 1  # one batch short: trained again
    torch.save(ckpt, last)
    assert main_cli.check_reuse(cfg)[0] == main_cli.NO_RUN
