"""Connectivity-aware salience (networks/salience.py, salience_generation.py): docs/DESIGN.md sections 1, 1b."""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REAL_SERIES, SEED_WEIGHTS
from dataloaders.inputs import model_input
from networks.salience import (
    FPN_BLOCKS,
    RECEPTIVE_RADIUS,
    AnalyticGenerator,
    BankGenerator,
    FPNGenerator,
    ResidualGate,
    SalienceHead,
    SalienceModule,
    SeedFPN,
    default_head_path,
    fold_bank_into_conv,
    fpn_kernels,
    load_fpn,
    load_head,
    make_generator,
    salience_2d,
    salience_3d,
    square_wave_bank,
    standardise_planes,
)

import salience_generation as sg


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    # numpy's comparison: torch.testing imports torch.distributed (seconds) on first use
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- closed forms
def _square(x: float, parity: str) -> float:
    total = 0.0
    for j in range(30):
        n = 2 * j + 1
        total += ((-1) ** j) * math.cos(n * x) / n if parity == "even" else math.sin(n * x) / n
    return 4.0 / math.pi * total


def _kernel(k: int, sigma: float, lam: float, theta: float, parities: tuple[str, ...]) -> np.ndarray:
    """Scalar-loop closed form: [row, col] <-> (v, u) = (row - c, col - c)."""
    c = k // 2
    out = np.zeros((k, k))
    for row in range(k):
        for col in range(k):
            u, v = col - c, row - c
            x = u * math.cos(theta) + v * math.sin(theta)
            y = -u * math.sin(theta) + v * math.cos(theta)
            w = math.exp(-(x * x + y * y) / (2 * sigma * sigma))
            out[row, col] = w * sum(_square(2 * math.pi / lam * x, p) for p in parities)
    return out


def test_square_wave_bank_equals_closed_form():
    bank = square_wave_bank(torch.float64).numpy()
    assert bank.shape == (60, 1, 11, 11)
    for s, k in enumerate((3, 5, 7, 9, 11)):
        off = (11 - k) // 2
        for i in range(12):
            ref = np.zeros((11, 11))
            ref[off:off + k, off:off + k] = _kernel(k, k, k - 1, i * math.pi / 12, ("even", "odd"))
            np.testing.assert_allclose(bank[s * 12 + i, 0], ref, atol=1e-10, err_msg=f"k={k} i={i}")


def test_fpn_fixed_kernels_equal_closed_form_and_released_weights():
    released = torch.load(SEED_WEIGHTS, map_location="cpu", weights_only=True) if SEED_WEIGHTS.is_file() else None
    for b, (sigma, lam, k, _dil, _pad) in enumerate(FPN_BLOCKS, start=1):
        for parity in ("odd", "even"):
            w = fpn_kernels(k, sigma, lam, parity, torch.float64).numpy()
            assert w.shape == (12, 12, k, k)
            for o in range(12):
                ref = _kernel(k, sigma, lam, math.radians(60 * o), (parity,))
                ref /= ref[ref > 0].sum()
                for c in (0, 5, 11):
                    np.testing.assert_allclose(w[o, c], ref, atol=1e-10)
            if released is not None:  # the authors' stored fixed weights are the same numbers
                stored = released[f"wavelet_{b}.0.wavelet_conv_{parity}.weight"].double().numpy()
                np.testing.assert_allclose(w, stored, atol=1e-6)


def _line(n: int, angle: float, width: float) -> torch.Tensor:
    """Bright line through the centre along direction (cos a, sin a) in (col, row) coordinates."""
    r, c = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    dist = np.abs(-c * math.sin(angle) + r * math.cos(angle))
    return torch.from_numpy(np.clip(1.0 - dist / width, 0, None))[None, None]


@pytest.mark.parametrize("width", [0.7, 1.0, 1.5])
def test_line_answers_in_the_orientation_channel_of_its_direction(width):
    """Kernel theta varies along x = u cos(theta) + v sin(theta), i.e. along (cos, sin) in
    (col, row), and is constant along (-sin, cos) = direction theta + 90 deg. So a line at
    angle a answers most in theta = a - 90 deg (mod 180). 11x11, 9x9 and 7x7 resolve the
    15-degree steps exactly; 5x5 and 3x3 grids alias them, so they must land within one step."""
    bank = square_wave_bank(torch.float64)
    for i in range(12):
        img = _line(61, i * math.pi / 12 + math.pi / 2, width)
        peak = F.conv2d(img, bank, padding=5)[0, :, 15:-15, 15:-15].amax(dim=(1, 2)).view(5, 12)
        best = peak.argmax(dim=1).tolist()
        for s, k in enumerate((3, 5, 7, 9, 11)):
            step = min((best[s] - i) % 12, (i - best[s]) % 12)
            assert step <= (0 if k >= 7 else 1), f"k={k}, line orientation {i}: best channel {best[s]}"
    # off-grid angles (4 degrees from a bank orientation) go to the nearest one for the large kernels
    for i in range(0, 12, 3):
        for off in (-4, 4):
            img = _line(61, i * math.pi / 12 + math.pi / 2 + math.radians(off), width)
            peak = F.conv2d(img, bank, padding=5)[0, :, 15:-15, 15:-15].amax(dim=(1, 2)).view(5, 12)
            assert peak[3:].argmax(dim=1).tolist() == [i, i]


# ----------------------------------------------------------------------------- standardisation
def test_standardise_planes_over_positive_pixels():
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.2, 1, (3, 1, 9, 7)).astype(np.float32)
    a[1] = 0.0  # no positive pixel
    a[2] = np.where(a[2] > 0, 0.5, 0.0)  # constant positive part: std 0
    got = standardise_planes(torch.from_numpy(a)).numpy()
    pos = a[0] > 0
    ref = np.where(pos, (a[0] - a[0][pos].mean()) / a[0][pos].std(), 0)
    np.testing.assert_allclose(got[0], ref, atol=1e-5)
    assert not got[1].any() and not got[2].any()


# ----------------------------------------------------------------------------- padding / folding
def _random_fpn(seed: int) -> SeedFPN:
    torch.manual_seed(seed)
    net = SeedFPN()
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(0.0, 0.5)
    return net.eval()


def _reference_canvas(kind: str, std_canvas: torch.Tensor, head: SalienceHead, net: SeedFPN) -> torch.Tensor:
    """Layer by layer, the way the authors ran it, on a zero canvas."""
    with torch.no_grad():
        if kind == "bank":
            return head(F.conv2d(std_canvas, square_wave_bank(), padding=5))
        if kind == "fpn":
            return net(std_canvas)
        r = F.conv2d(std_canvas, square_wave_bank(), padding=5)
        n, _, h, w = r.shape
        return r.view(n, 5, 12, h, w).amax(2).clamp(min=0).mean(1, keepdim=True)


@pytest.mark.parametrize("kind", ["bank", "fpn", "analytic"])
def test_salience_2d_equals_plane_in_larger_zero_canvas(kind):
    torch.manual_seed(1)
    head, net = SalienceHead().eval(), _random_fpn(2)
    gen = {"bank": lambda: BankGenerator(head), "fpn": lambda: FPNGenerator(net), "analytic": AnalyticGenerator}[kind]()
    planes = torch.rand(2, 1, 23, 31) - 0.1
    got = salience_2d(planes, gen)
    pad = (13, 21, 17, 9)  # left, right, top, bottom: off-centre, more than the 8 the reference needs
    canvas = F.pad(planes, pad)
    crop = (slice(None), slice(None), slice(17, 17 + 23), slice(13, 13 + 31))
    # standardisation ignores zeros, so the canvas standardises to the padded standardised plane
    _close(salience_2d(canvas, gen)[crop], got, atol=2e-5, rtol=1e-4)
    ref = _reference_canvas(kind, standardise_planes(canvas), head, net)[crop]
    _close(got, ref, atol=2e-5, rtol=1e-4)


def test_salience_2d_batches_under_memory_bound():
    torch.manual_seed(3)
    gen = BankGenerator(SalienceHead().eval())
    planes = torch.rand(5, 1, 20, 16)
    whole = salience_2d(planes, gen, max_batch_voxels=10**9)
    one_by_one = salience_2d(planes, gen, max_batch_voxels=1)
    _close(whole, one_by_one, atol=1e-6, rtol=1e-5)



def test_bank_cpu_blocks_and_row_strips_give_the_same_map():
    """BankGenerator cuts a CPU call into cache-sized blocks: whole planes, or row strips."""
    torch.manual_seed(6)
    gen = BankGenerator(SalienceHead().eval())
    padded = F.pad(torch.randn(5, 1, 21, 16), (7, 7, 7, 7))  # 35 x 30 = 1050 pixels per plane
    with torch.inference_mode():
        gen.block_pixels = 10**9
        whole = gen(padded)
        for block in (2500, 600, 1):  # 2 planes per block; strips of 6 rows; strips of 1 row
            gen.block_pixels = block
            _close(gen(padded), whole, atol=1e-6, rtol=1e-5)
    assert whole.shape == (5, 1, 21, 16)

def test_bank_cpu_blocks_cropped_to_their_non_zero_part_give_the_same_map():
    """Outside the rectangle of outputs within 7 px of a non-zero input the map is the
    generator's zero-field value; cropping to it must not change a single output."""
    torch.manual_seed(8)
    gen = BankGenerator(SalienceHead().eval())
    x = torch.zeros(4, 1, 40, 36)
    x[0, 0, 12:20, 9:15] = torch.randn(8, 6)  # a blob in the middle
    x[1, 0, 0:3, 33:36] = torch.randn(3, 3)  # a corner
    x[2, 0, 25, 4] = 1.5  # one pixel
    padded = F.pad(x, (7, 7, 7, 7))  # plane 3 stays all zero
    with torch.inference_mode():
        reference = gen._layers(padded)
        zero = gen.zero_value()
        for block in (10**9, 54 * 50, 400):  # all planes in one block; one plane; row strips
            gen.block_pixels = block
            _close(gen(padded), reference, atol=1e-6, rtol=1e-5)
    assert zero.shape == (1, 1, 1, 1)
    # the corner blob reaches only 7 px: the far corner is the zero-field value, the plane 3 too
    assert torch.allclose(reference[1, 0, 30:, :20], zero[0, 0].expand(10, 20), atol=1e-6)
    assert torch.allclose(reference[3], zero[0].expand(1, 40, 36), atol=1e-6)
    assert not torch.allclose(reference[1, 0, 0, 30], zero[0, 0, 0, 0], atol=1e-4)


def test_salience_3d_progress_bar_counts_every_plane(capsys, monkeypatch):
    import networks.salience as sal_mod
    from tqdm import tqdm

    closed = []

    class Recording(tqdm):
        def close(self):
            closed.append((self.total, self.n, self.disable))
            super().close()

    monkeypatch.setattr(sal_mod, "tqdm", Recording)
    vol = np.random.default_rng(2).uniform(size=(12, 10, 6)).astype(np.float32)
    gen = AnalyticGenerator()
    quiet = salience_3d(vol, gen)
    assert "salience" not in capsys.readouterr().err
    shown = salience_3d(vol, gen, progress=True)
    assert "salience" in capsys.readouterr().err
    # 6 transverse + 12 coronal + 10 sagittal planes, all counted
    assert (28, 28, False) in closed and closed[0][2] is True
    np.testing.assert_array_equal(shown, quiet)


# ----------------------------------------------------------------------------- seed fpn
@pytest.mark.skipif(not SEED_WEIGHTS.is_file(), reason="authors' fpn weights not present")
@pytest.mark.skipif(not REAL_SERIES.is_dir(), reason="real 3D-IRCADb series not present")
def test_seed_fpn_loads_strictly_and_answers_on_a_real_plane():
    pydicom = pytest.importorskip("pydicom")
    net = load_fpn(SEED_WEIGHTS)  # strict=True inside
    state = torch.load(SEED_WEIGHTS, map_location="cpu", weights_only=True)
    assert set(net.state_dict()) == set(state)
    ds = pydicom.dcmread(REAL_SERIES / "image_60")
    hu = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0))
    image = torch.from_numpy((np.clip(hu, 0, 400) / 400).astype(np.float32))[None, None]
    out = salience_2d(image, FPNGenerator(net))
    assert out.shape == image.shape
    assert torch.isfinite(out).all()
    assert float(out.std()) > 1e-3
    # the fold is exact on real data too: layer by layer in the authors' zero canvas, on a
    # 96 x 96 window of the plane (the window's own standardisation, to keep the test fast)
    window = image[:, :, 200:296, 150:246]
    canvas = F.pad(standardise_planes(window), (8, 8, 8, 8))
    with torch.no_grad():
        ref = net(canvas)[:, :, 8:-8, 8:-8]
    _close(salience_2d(window, FPNGenerator(net)), ref, atol=1e-4, rtol=1e-4)


def test_load_fpn_rejects_other_weights(tmp_path):
    bad = tmp_path / "head.pth"
    torch.save(SalienceHead().state_dict(), bad)
    with pytest.raises(ValueError, match="head.pth"):
        load_fpn(bad)


# ----------------------------------------------------------------------------- three planes
def test_salience_3d_planes_order_and_orientation():
    """A volume varying along the slice axis only: transverse planes are constant, and with
    H == W the coronal plane h (W x D) and the sagittal plane w (H x D) are the same image,
    so S_c[h, w, d] = S_s[w, h, d]; S_c does not depend on h, S_s not on w."""
    torch.manual_seed(4)
    gen = BankGenerator(SalienceHead().eval())
    d = np.arange(10)
    profile = 0.3 + 0.5 * (np.abs(d - 4) <= 1) + 0.02 * d
    vol = np.broadcast_to(profile, (12, 12, 10)).astype(np.float32)
    s = salience_3d(vol, gen)
    assert s.shape == (3, 12, 12, 10) and s.dtype == np.float32
    assert s.min() == 0.0 and s.max() == 1.0
    np.testing.assert_allclose(s[1], s[2].transpose(1, 0, 2), atol=1e-6)
    np.testing.assert_allclose(s[1], np.broadcast_to(s[1][:1], s[1].shape), atol=1e-6)
    np.testing.assert_allclose(s[2], np.broadcast_to(s[2][:, :1], s[2].shape), atol=1e-6)
    assert np.ptp(s[0]) < 1e-6  # a constant plane standardises to zeros
    assert np.ptp(s[1][0]) > 0.1


def test_salience_3d_channels_are_the_documented_planes():
    """Against explicit indexing V[:, :, d] (H x W), V[h, :, :] (W x D), V[:, w, :] (H x D)."""
    torch.manual_seed(5)
    gen = BankGenerator(SalienceHead().eval())
    rng = np.random.default_rng(5)
    vol = rng.uniform(0, 1, (9, 11, 7)).astype(np.float32)
    s = salience_3d(vol, gen)
    raw = np.zeros((3, 9, 11, 7), dtype=np.float32)

    def one(plane: np.ndarray) -> np.ndarray:
        return salience_2d(torch.from_numpy(np.ascontiguousarray(plane))[None, None], gen)[0, 0].numpy()

    for z in range(7):
        raw[0][:, :, z] = one(vol[:, :, z])
    for h in range(9):
        raw[1][h, :, :] = one(vol[h, :, :])
    for w in range(11):
        raw[2][:, w, :] = one(vol[:, w, :])
    ref = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(s, ref, atol=1e-5)


def test_analytic_divides_by_the_volume_percentile():
    gen = AnalyticGenerator()
    raw = np.linspace(0, 2, 10001, dtype=np.float32).reshape(1, 1, 1, -1).repeat(3, 0)
    out = gen.finalize(raw)
    p = np.percentile(raw, 99.9)
    np.testing.assert_allclose(out, np.clip(raw / p, 0, 1), atol=1e-4)


# ----------------------------------------------------------------------------- e2e
def test_salience_module_gradients_reach_head_never_bank():
    torch.manual_seed(6)
    mod = SalienceModule()
    assert "bank" not in dict(mod.named_parameters()) and not mod.bank.requires_grad
    assert all(k.startswith("head.out_conv.") for k in mod.state_dict())
    bank0 = mod.bank.clone()
    x = torch.rand(2, 1, 10, 8, 6)
    s = mod(x)
    assert s.shape == (2, 3, 10, 8, 6)
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    s.mean().backward()
    grads = [p.grad for p in mod.head.parameters()]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert mod.bank.grad is None
    opt.step()
    assert torch.equal(mod.bank, bank0)
    # 5-D channels are the 2-D salience of the patch's planes, in the documented orientations
    with torch.no_grad():
        s = mod(x)
        _close(s[:, 0, :, :, 2], mod(x[:, :, :, :, 2]).squeeze(1))
        _close(s[:, 1, 3], mod(x[:, :, 3]).squeeze(1))
        _close(s[:, 2, :, 4], mod(x[:, :, :, 4]).squeeze(1))
    assert mod(torch.rand(2, 1, 12, 9)).shape == (2, 1, 12, 9)
    with pytest.raises(ValueError):
        mod(torch.rand(2, 2, 12, 9))


def test_residual_gate_matches_offline_input():
    rng = np.random.default_rng(7)
    g = rng.uniform(0, 1, (4, 5, 3)).astype(np.float32)
    s = rng.uniform(0, 1, (3, 4, 5, 3)).astype(np.float32)
    got = ResidualGate()(torch.from_numpy(g)[None, None], torch.from_numpy(s)[None])[0].numpy()
    np.testing.assert_allclose(got, model_input(g, s, "offline"), atol=1e-6)


@pytest.mark.parametrize("prefix", ["", "wavelet.", "salience.", "salience.head."])
def test_load_head_reads_state_dict_prefixes(tmp_path, prefix):
    torch.manual_seed(8)
    head = SalienceHead()
    state = {prefix + k: v for k, v in head.state_dict().items()}
    state["backbone.conv.weight"] = torch.zeros(2)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state} if prefix.startswith("salience.head") else state, path)
    loaded = load_head(path)
    for k, v in head.state_dict().items():
        _close(loaded.state_dict()[k], v)


def test_load_head_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_head(tmp_path / "nothere.pth")
    bad = tmp_path / "nohead.pth"
    torch.save({"x.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="nohead.pth"):
        load_head(bad)


# ----------------------------------------------------------------------------- shipped head
def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    from scipy.stats import rankdata

    r = rankdata(score)
    n1 = int(positive.sum())
    n0 = positive.size - n1
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_shipped_head_beats_raw_intensity_on_a_phantom_test_patient():
    """A held-out demo-preset patient (0.9 x 0.9 x 1.6 mm, a seed the head never saw), a
    96 x 96 x 24 window at the liver's centre to keep the test fast. (On the coarse "tiny"
    preset, 1.5 x 1.5 x 2.5 mm, the head does NOT beat intensity: see the report.)"""
    generator = pytest.importorskip("phantom.generator")
    assert default_head_path().is_file(), "pretrained/bank_head_phantom.pth is missing"
    p = generator.generate_patient(1, seed=123, preset="demo")
    centre = [int(np.mean(ix)) for ix in np.nonzero(p.masks["liver"])]
    box = tuple(slice(max(0, c - n // 2), max(0, c - n // 2) + n) for c, n in zip(centre, (96, 96, 24)))
    image = (np.clip(p.hu[box].astype(np.float32), 0, 400) / 400).astype(np.float32)
    vessel = (p.masks["portalvein"][box] | p.masks["venoussystem"][box]).astype(bool)
    liver = p.masks["liver"][box].astype(bool)
    assert vessel[liver].sum() > 100
    s = salience_3d(image, BankGenerator(load_head(default_head_path())))
    auc_s = _auc(s.mean(0)[liver], vessel[liver])
    auc_i = _auc(image[liver], vessel[liver])
    assert auc_s > auc_i, (auc_s, auc_i)


# ----------------------------------------------------------------------------- CLI
def _args(ds, *extra: str) -> list[str]:
    return ["--dataset", ds.dataset, "--root_path", str(ds.root_path), "--list_dir", str(ds.list_dir), *extra]


def test_cli_generates_skips_and_overwrites(tiny_dataset_no_salience):
    ds = tiny_dataset_no_salience
    assert sg.main(_args(ds, "--generator", "analytic")) == 0
    cases = sum(ds.splits.values(), [])
    for case in cases:
        with h5py.File(ds.paths.salience(case), "r") as f:
            assert f["salience"].shape == (3, 32, 32, 12)
            assert f.attrs["generator"] == "analytic"
            sal = f["salience"][()]
        assert 0.0 <= sal.min() and sal.max() <= 1.0
    case = ds.splits["train"][0]
    sal = h5py.File(ds.paths.salience(case), "r")["salience"][()]
    with h5py.File(ds.paths.slice(f"{case}_slice0005"), "r") as f:
        np.testing.assert_array_equal(f["salience"][()], sal[:, :, :, 5])
        assert f["image"].shape == (32, 32) and "label" in f
    mtime = ds.paths.salience(case).stat().st_mtime_ns
    status = sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "analytic")
    assert set(status.values()) == {"skipped"}
    assert ds.paths.salience(case).stat().st_mtime_ns == mtime
    # preprocess.py wrote one volume again (same shape, other content): only its map is made again
    from utils.h5io import read_volume, write_volume

    vol = read_volume(ds.paths.volume(case))
    vol.image[:] = vol.image[::-1]
    write_volume(ds.paths.volume(case), vol)
    status = sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "analytic")
    assert status[case] == "written" and {s for c, s in status.items() if c != case} == {"skipped"}
    status = sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "bank", overwrite=True)
    assert set(status.values()) == {"written"}
    with h5py.File(ds.paths.salience(case), "r") as f:
        assert f.attrs["generator"] == "bank" and len(f.attrs["weights_sha256"]) == 64


def test_cli_fit_writes_self_describing_checkpoint_and_uses_it(tiny_dataset_no_salience, tmp_path):
    ds = tiny_dataset_no_salience
    ck_dir = tmp_path / "ck"
    rc = sg.main(_args(ds, "--fit", "--iters", "3", "--batch", "2", "--patch", "24",
                       "--checkpoint_dir", str(ck_dir), "--generator", "bank"))
    assert rc == 0
    path = ck_dir / ds.dataset / "bank_fit.pth"
    ck = torch.load(path, weights_only=True)
    assert ck["generator"] == "bank" and ck["data"]["cases"] == ds.splits["train"]
    assert len(ck["loss_curve"]) == 3 and ck["bank"]["sizes"] == [3, 5, 7, 9, 11]
    load_head(path)
    from networks.salience import file_sha256

    with h5py.File(ds.paths.salience(ds.splits["test"][0]), "r") as f:
        assert f.attrs["weights_sha256"] == file_sha256(path)
    # fitting again without --overwrite refuses, naming the file
    assert sg.main(_args(ds, "--fit", "--iters", "1", "--checkpoint_dir", str(ck_dir))) == 1


def test_cli_bad_input_one_line_error(tiny_dataset_no_salience, tmp_path, capsys):
    ds = tiny_dataset_no_salience

    def error_of(argv: list[str]) -> str:
        capsys.readouterr()
        assert sg.main(argv) == 1
        lines = [ln for ln in capsys.readouterr().err.splitlines() if "ERROR" in ln]
        assert len(lines) == 1
        return lines[0]

    assert "nope/vol_data" in error_of(["--dataset", "nope", "--root_path", str(ds.root_path),
                                        "--list_dir", str(ds.list_dir)])
    assert "missing.pth" in error_of(_args(ds, "--generator", "fpn", "--weights", str(tmp_path / "missing.pth")))
    ds.paths.list_file("vol_val").unlink()
    assert "vol_val.txt" in error_of(_args(ds, "--generator", "analytic"))
    assert not ds.paths.vol_salience.exists()


# ----------------------------------------------------------------------------- e2e speed-ups stay exact
def _unfolded_planes(head: SalienceHead, bank: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer-by-layer e2e salience of planes (N, 1, h, w): bank (zero padding 5), then the head."""
    return head(F.conv2d(x, bank.to(x.dtype), padding=5))


def _randomised_module(seed: int) -> SalienceModule:
    torch.manual_seed(seed)
    mod = SalienceModule()
    with torch.no_grad():  # larger weights than the default init, so border errors cannot hide
        for p in mod.head.parameters():
            p.mul_(3.0)
    return mod


def test_fold_bank_into_conv_equals_conv_then_conv_inside_the_plane():
    torch.manual_seed(11)
    bank = square_wave_bank(torch.float64)
    w = torch.randn(4, 60, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 1, 30, 31, dtype=torch.float64)
    two = F.conv2d(F.conv2d(x, bank), w)  # valid: no zero padding between the two
    one = F.conv2d(x, fold_bank_into_conv(bank, w))
    _close(one, two, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", [(3, 1, 17, 23), (2, 1, 1, 9), (2, 1, 6, 1), (1, 1, 2, 3), (1, 1, 13, 12)])
def test_salience_module_planes_equal_unfolded_outputs_and_head_gradients(shape):
    mod = _randomised_module(21)
    x = torch.randn(*shape) * 2
    fast = mod(x)
    ref = _unfolded_planes(mod.head, mod.bank, x)
    assert fast.shape == shape
    _close(fast, ref, atol=1e-5, rtol=0)
    g = torch.rand(shape)
    params = list(mod.head.parameters())
    g_fast = torch.autograd.grad(fast, params, g)
    g_ref = torch.autograd.grad(ref, params, g)
    for a, b in zip(g_fast, g_ref):
        _close(a, b, atol=1e-4 * float(b.abs().max()), rtol=0)


@pytest.mark.parametrize("shape", [(2, 1, 9, 7, 5), (1, 1, 6, 6, 6), (1, 1, 8, 8, 5)])
def test_salience_module_volume_equals_unfolded_planes(shape):
    """Cubes (one call for the three stacks), two equal plane shapes, all different."""
    mod = _randomised_module(22)
    x = torch.rand(*shape, requires_grad=True)
    fast = mod(x)
    b, _, h, w, d = shape
    ref = lambda p: _unfolded_planes(mod.head, mod.bank, p)  # noqa: E731
    t = ref(x[:, 0].permute(0, 3, 1, 2).reshape(b * d, 1, h, w)).view(b, d, h, w).permute(0, 2, 3, 1)
    c = ref(x[:, 0].reshape(b * h, 1, w, d)).view(b, h, w, d)
    s = ref(x[:, 0].permute(0, 2, 1, 3).reshape(b * w, 1, h, d)).view(b, w, h, d).permute(0, 2, 1, 3)
    expect = torch.stack([t, c, s], dim=1)
    _close(fast, expect, atol=1e-5, rtol=0)
    g = torch.rand(fast.shape)
    params = list(mod.head.parameters()) + [x]
    for a, b_ in zip(torch.autograd.grad(fast, params, g), torch.autograd.grad(expect, params, g)):
        _close(a, b_, atol=1e-4 * float(b_.abs().max()), rtol=0)


@pytest.mark.parametrize(
    "frozen, layout",
    [("none", "nchw"), ("first", "nchw"), ("head", "nchw"), ("none", "channels_last"), ("head", "channels_last")],
)
def test_salience_module_chunks_and_partial_gradients_equal_unfolded(monkeypatch, frozen, layout):
    """Several CPU chunks (uneven), float64 so that any missing term shows; gradients to the
    image too, with the first convolution or the whole head frozen (the image's alone); both
    memory layouts (channels-last is the GPU's)."""
    import networks.salience as ns

    monkeypatch.setattr(ns, "E2E_CPU_BLOCK_PIXELS", 2 * 9 * 11)
    monkeypatch.setattr(ns, "E2E_CPU_LAYOUT", torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    mod = _randomised_module(25).double()
    frozen_params = {"none": [], "first": list(mod.head.out_conv[0].parameters()), "head": list(mod.head.parameters())}
    for p in frozen_params[frozen]:
        p.requires_grad_(False)
    x = (torch.randn(5, 1, 9, 11, dtype=torch.float64) * 2).requires_grad_()
    assert len(ns._plane_chunks(5, 9, 11, x.device)) == 3
    fast = mod(x)
    ref = _unfolded_planes(mod.head, mod.bank, x)
    _close(fast, ref, atol=1e-12, rtol=0)
    g = torch.rand(fast.shape, dtype=torch.float64)
    params = [p for p in mod.head.parameters() if p.requires_grad] + [x]
    for a, b in zip(torch.autograd.grad(fast, params, g), torch.autograd.grad(ref, params, g)):
        _close(a, b, atol=1e-10 * float(b.abs().max()), rtol=0)


def test_salience_module_backward_once_and_no_saving_without_grad():
    mod = _randomised_module(26)
    x = torch.rand(1, 1, 6, 7, 5)
    y = mod(x)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        y.sum().backward()
    with torch.no_grad():
        assert mod(x).grad_fn is None
    assert mod(x).grad_fn is not None


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_salience_module_autocast_gradients_in_parameter_dtype(monkeypatch, layout):
    import networks.salience as ns

    monkeypatch.setattr(ns, "E2E_CPU_LAYOUT", torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    mod = _randomised_module(27)
    x = torch.rand(1, 1, 10, 9, 8)
    g = torch.rand(1, 3, 10, 9, 8)
    params = list(mod.head.parameters())
    full = torch.autograd.grad(mod(x), params, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x)
    assert y.dtype == torch.bfloat16
    half = torch.autograd.grad(y, params, g.bfloat16())
    for a, b in zip(half, full):
        assert a.dtype == torch.float32
        # bf16 rounding of every factor: a few per cent of the largest entry
        assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())


def test_salience_module_under_autocast_convolves_in_bf16():
    from torch.utils._python_dispatch import TorchDispatchMode

    class ConvDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution):
                self.seen.append((args[0].dtype, tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    mod = _randomised_module(23)
    x = torch.rand(1, 1, 12, 12, 12)
    with torch.no_grad():
        full = mod(x)
        with torch.autocast("cpu", dtype=torch.bfloat16), ConvDtypes() as mode:
            half = mod(x)
    assert mode.seen and all(dt == torch.bfloat16 for dt, _ in mode.seen), mode.seen
    assert half.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: the salience (in (0, 1)) agrees to a few hundredths
    assert float((half.float() - full).abs().max()) < 0.05


def test_salience_module_keeps_its_state_dict_and_loads_the_head(tmp_path):
    mod = _randomised_module(24)
    assert sorted(mod.state_dict()) == sorted(f"head.out_conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))
    path = tmp_path / "model.pth"
    torch.save({"state_dict": {f"salience.{k}": v for k, v in mod.state_dict().items()}}, path)
    again = SalienceModule.from_head_file(path)
    x = torch.rand(2, 1, 7, 9)
    _close(again(x), mod(x))


# ----------------------------------------------------------------------------- normalisation rules
def test_fixed_standardisation_worked_values():
    from networks.salience import FIXED_MEAN, FIXED_STD, standardise_planes_fixed

    plane = torch.tensor([[0.0, FIXED_MEAN, FIXED_MEAN + FIXED_STD], [FIXED_MEAN - FIXED_STD, 1.0, 0.0]])
    got = standardise_planes_fixed(plane[None, None])[0, 0].numpy()
    want = np.array([[0.0, 0.0, 1.0], [-1.0, (1.0 - FIXED_MEAN) / FIXED_STD, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        standardise_planes_fixed(plane)


def _with_bone_slab(vol: np.ndarray, n: int) -> np.ndarray:
    slab = np.where(vol[:, :, -1:] > 0, 1.0, 0.0).astype(np.float32)
    return np.concatenate([vol, np.repeat(slab, n, axis=2)], axis=2)


def test_fixed_rule_salience_does_not_depend_on_the_scan_extent():
    """Slices added beyond the receptive radius change nothing under ``fixed``; under ``volume``
    the coronal / sagittal standardisation and the min-max move every voxel."""
    rng = np.random.default_rng(3)
    vol = np.clip(0.25 + 0.08 * rng.standard_normal((24, 20, 30)), 0, 1).astype(np.float32)
    vol[10:13, :, :] = 0.45  # a bright vessel along the columns
    longer = _with_bone_slab(vol, 12)
    keep = slice(0, vol.shape[2] - RECEPTIVE_RADIUS)  # slices whose coronal / sagittal field stays inside
    fixed = make_generator("bank", default_head_path(), "fixed")
    a, b = salience_3d(vol, fixed), salience_3d(longer, fixed)
    np.testing.assert_allclose(b[:, :, :, keep], a[:, :, :, keep], atol=1e-6)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    volume = make_generator("bank", default_head_path(), "volume")
    c, d = salience_3d(vol, volume), salience_3d(longer, volume)
    assert float(np.abs(d[:, :, :, keep] - c[:, :, :, keep]).max()) > 0.01
    # ``fixed`` keeps the head's sigmoid: the transverse channel is the 2-D map of each slice
    one = salience_2d(torch.from_numpy(vol[:, :, 5].copy())[None, None], fixed)[0, 0].numpy()
    np.testing.assert_allclose(a[0, :, :, 5], one, atol=1e-6)


def test_fixed_rule_is_for_the_bank_generator_only(tmp_path):
    with pytest.raises(ValueError, match="supports normalisation volume, not 'fixed'"):
        make_generator("analytic", None, "fixed")
    with pytest.raises(ValueError, match="unknown normalisation 'minmax'"):
        make_generator("bank", default_head_path(), "minmax")
    with pytest.raises(ValueError, match="--normalisation fixed is for the bank generator"):
        sg.run("x", str(tmp_path), str(tmp_path), "analytic", normalisation="fixed")


def test_checkpoint_carries_the_normalisation_rule():
    from networks.checkpoint import generator_from_checkpoint, generator_record

    rec = generator_record("bank", default_head_path(), "fixed")
    assert rec["normalisation"] == "fixed"
    gen = generator_from_checkpoint({"salience": "offline", "generator": rec})
    assert gen.normalisation == "fixed" and gen.weights_sha256 == rec["weights_sha256"]
    # a checkpoint written before the rule existed made its maps the paper's way
    old = {k: v for k, v in rec.items() if k != "normalisation"}
    assert generator_from_checkpoint({"salience": "offline", "generator": old}).normalisation == "volume"
    # a head file given on the command line keeps the embedded rule
    assert generator_from_checkpoint({"salience": "offline", "generator": rec},
                                     head=default_head_path()).normalisation == "fixed"


def test_generation_records_the_rule_in_every_map(tiny_dataset):
    ds = tiny_dataset
    status = sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "bank", overwrite=True, normalisation="volume")
    assert set(status.values()) == {"written"}
    assert sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "bank",
                  normalisation="volume") == {c: "skipped" for c in status}
    # maps of the other rule (the bank's default, fixed) are made again without --overwrite, and so
    # are their slices
    status = sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "bank")
    assert set(status.values()) == {"written"}
    for case in status:
        with h5py.File(ds.paths.salience(case), "r") as f:
            assert f.attrs["normalisation"] == "fixed" and f.attrs["generator"] == "bank"
            vol_map = f["salience"][()]
        for z, path in sg.case_slices(ds.paths, case):
            with h5py.File(path, "r") as f:
                np.testing.assert_array_equal(f["salience"][()], vol_map[:, :, :, z])


def test_fitting_options_without_fit_are_a_usage_error(tmp_path, capsys):
    """--iters, --seed, ... are read only when fitting: without --fit they would do nothing."""
    import salience_generation as sg

    with pytest.raises(SystemExit) as e:
        sg.main(["--dataset", "nothing", "--root_path", str(tmp_path), "--iters", "5", "--seed", "3"])
    assert e.value.code == 2
    assert "--iters, --seed only apply with --fit" in capsys.readouterr().err


def test_weights_for_the_analytic_generator_are_a_usage_error(tmp_path, capsys):
    import salience_generation as sg

    with pytest.raises(SystemExit) as e:
        sg.main(["--dataset", "nothing", "--root_path", str(tmp_path), "--generator", "analytic",
                 "--weights", str(tmp_path / "w.pth")])
    assert e.value.code == 2 and "the analytic generator has no weights" in capsys.readouterr().err


def test_a_head_fitted_under_one_normalisation_is_refused_under_the_other(tiny_dataset_no_salience, tmp_path):
    """A fitted head records its rule; maps made under the other one are not what it learnt,
    so generation stops before any map is written. The shipped head records none and runs."""
    ds = tiny_dataset_no_salience
    ckpt = torch.load(default_head_path(), map_location="cpu", weights_only=True)
    ckpt["fit"] = {**ckpt["fit"], "normalisation": "volume"}
    head = tmp_path / "volume_head.pth"
    torch.save(ckpt, head)
    assert sg.fitted_normalisation(head) == "volume" and sg.fitted_normalisation(default_head_path()) is None
    with pytest.raises(ValueError, match=r"fitted under --normalisation volume, and the maps would be made under "
                                         r"fixed: pass --normalisation volume"):
        sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "bank", str(head))
    assert not any(ds.paths.salience(c).exists() for c in sum(ds.splits.values(), []))
    status = sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "bank", str(head), normalisation="volume")
    assert set(status.values()) == {"written"}


def test_a_stopped_first_run_leaves_its_manifest_marked(tiny_dataset_no_salience, monkeypatch):
    ds = tiny_dataset_no_salience
    path = ds.paths.vol_salience / "manifest.json"
    assert not path.exists()

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sg, "salience_3d", stop)
    with pytest.raises(KeyboardInterrupt):
        sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "analytic")
    assert json.loads(path.read_text())["in_progress"] is True
    monkeypatch.undo()
    sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "analytic")
    doc = json.loads(path.read_text())
    assert "in_progress" not in doc and sorted(doc["cases"]) == sorted(sum(ds.splits.values(), []))


def test_a_run_stopped_among_a_cases_slices_is_redone_in_full(tiny_dataset_no_salience, monkeypatch):
    """analytic maps first; then bank maps, stopped after two slice files of the first training case;
    the rerun must not take that case for done (its other slices still hold the analytic maps):
    every slice file ends equal to its volume map."""
    ds = tiny_dataset_no_salience
    sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "analytic")
    written = []
    add = sg.add_slice_salience

    def stop_after_two(path, sal):
        if len(written) == 2:
            raise KeyboardInterrupt
        add(path, sal)
        written.append(path)

    monkeypatch.setattr(sg, "add_slice_salience", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "bank")
    monkeypatch.undo()
    case = ds.splits["train"][0]
    status = sg.run(ds.dataset, str(ds.root_path), str(ds.list_dir), "bank")
    assert status[case] == "written"
    with h5py.File(ds.paths.salience(case), "r") as f:
        assert f.attrs["generator"] == "bank"
        vol = f["salience"][()]
    for z in range(vol.shape[3]):
        with h5py.File(ds.paths.slice(f"{case}_slice{z:04d}"), "r") as f:
            np.testing.assert_array_equal(f["salience"][()], vol[:, :, :, z])
