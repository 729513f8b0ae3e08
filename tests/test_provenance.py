"""Outputs keyed by what made them: test.py and predict.py never pass off another model's results."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from evaluation.runner import run_evaluation
from prediction.segment import run_predict
from trainer import TrainConfig, train
from utils import provenance

TINY_2D = {"base_channels": 4, "depth": 2}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_record_and_mismatches():
    a = provenance.record("ab" * 32, {"tta": False, "img_size": (32, 32), "path": Path("/x")})
    # what was stored reads back from JSON: tuples and paths compare as lists and strings
    stored = json.loads(json.dumps(a))
    assert provenance.mismatches(stored, a) == []
    b = provenance.record("cd" * 32, {"tta": True, "img_size": (32, 32), "path": Path("/x")})
    differ = provenance.mismatches(stored, b)
    assert any(d.startswith("model_sha256: abababababab vs cdcdcdcdcdcd") for d in differ)
    assert "tta: False vs True now" in differ and len(differ) == 2
    # an option that only one side has differs too
    c = provenance.record("ab" * 32, {"tta": False, "img_size": [32, 32], "path": "/x", "new": 1})
    assert provenance.mismatches(stored, c) == ["new: None vs 1 now"]
    assert provenance.mismatches(None, a) == ["no provenance record (written by an older version)"]
    # the date is informative only
    assert provenance.mismatches({**stored, "created": "1999-01-01T00:00:00"}, a) == []


class _Messages(logging.Handler):
    """The messages of one logger (the trainer's setup_logging replaces the root handlers caplog uses)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.INFO)
        self.name_, self.text = name, ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"

    def __enter__(self) -> "_Messages":
        logging.getLogger(self.name_).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(self.name_).removeHandler(self)


def _cfg(ds, tmp_path: Path, **kw) -> TrainConfig:
    base = dict(dataset=ds.dataset, root_path=str(ds.root_path), list_dir=str(ds.list_dir),
                output_root=str(tmp_path / "ckpt"), model_kwargs=TINY_2D, img_size=(32, 32), batch_size=2,
                num_workers=0, max_epochs=1, val_batch_size=16, salience="none", max_iterations=2)
    base.update(kw)
    return TrainConfig(**base)


def test_retrained_model_gets_new_reports_and_masks(tiny_dataset, tmp_path):
    """Train, test, predict; retrain with other options (--overwrite); test and predict again: the
    new model's numbers and masks, never the first ones."""
    ds = tiny_dataset
    import h5py

    with h5py.File(ds.paths.volume("case0005"), "r") as f:
        vol_hu = f["image"][()] * 400.0
    vol_hu[:2] = -1000.0  # air: the CT check wants values below -50 HU
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(vol_hu, 2, 0).astype(np.float32)), str(scan))

    def evaluate():
        return run_evaluation(dataset=ds.dataset, backbone="unet", root_path=ds.root_path, list_dir=ds.list_dir,
                              checkpoint_root=tmp_path / "ckpt", device="cpu")

    def segment():
        res = run_predict(run_dir / "best_model.pth", scan, tmp_path / "pred", device="cpu")
        stats = json.loads((tmp_path / "pred" / "scan_stats.json").read_text())
        return res[0], stats

    first = train(_cfg(ds, tmp_path, seed=1))
    run_dir = first.run_dir
    sha1 = provenance.file_sha256(run_dir / "best_model.pth")
    rep1 = evaluate()
    pred1, stats1 = segment()
    assert not rep1.skipped and pred1.status == "written"
    summary1 = json.loads((rep1.output / "summary.json").read_text())
    assert summary1["meta"]["provenance"]["model_sha256"] == sha1 == stats1["provenance"]["model_sha256"]
    assert summary1["meta"]["code_version"] == provenance.code_version()
    # the same commands again reuse what is there
    assert evaluate().skipped and segment()[0].status == "skipped"
    # another scan under the same name is segmented again
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(vol_hu[::-1], 2, 0).astype(np.float32)), str(scan))
    with _Messages("predict") as said:
        assert segment()[0].status == "written"
    assert "input_sha256" in said.text

    # retrain with other options: the old report goes with the old model
    train(_cfg(ds, tmp_path, seed=2, max_iterations=4, overwrite=True))
    sha2 = provenance.file_sha256(run_dir / "best_model.pth")
    assert sha2 != sha1 and not rep1.output.exists()
    rep2 = evaluate()
    assert not rep2.skipped
    assert json.loads((rep2.output / "summary.json").read_text())["meta"]["provenance"]["model_sha256"] == sha2

    with _Messages("predict") as said:
        pred2, stats2 = segment()
    assert pred2.status == "written" and stats2["provenance"]["model_sha256"] == sha2
    assert "made by something else (model_sha256" in said.text

    # a report made by this model but with another option is computed again, saying which
    with _Messages("test") as said:
        rep3 = run_evaluation(dataset=ds.dataset, backbone="unet", root_path=ds.root_path, list_dir=ds.list_dir,
                              checkpoint_root=tmp_path / "ckpt", device="cpu", min_component_mm3=1e9,
                              output=rep2.output)
    assert not rep3.skipped and "min_component_mm3: None vs 1000000000.0 now" in said.text
    assert rep3.summary["voxels_pred"]["mean"] == 0


def test_report_of_rewritten_data_is_not_reused(tiny_dataset, tmp_path):
    ds = tiny_dataset
    train(_cfg(ds, tmp_path))
    kw = dict(dataset=ds.dataset, backbone="unet", root_path=ds.root_path, list_dir=ds.list_dir,
              checkpoint_root=tmp_path / "ckpt", device="cpu")
    assert not run_evaluation(**kw).skipped and run_evaluation(**kw).skipped
    # preprocess.py wrote the test case again (same name, new file)
    from utils.h5io import read_volume, write_volume

    vol = read_volume(ds.paths.volume("case0005"))
    ds.paths.volume("case0005").unlink()
    write_volume(ds.paths.volume("case0005"), vol)
    assert not run_evaluation(**kw).skipped


def test_outputs_without_a_record_are_recomputed(tiny_dataset, tmp_path):
    """Reports written before records existed are treated as another model's."""
    ds = tiny_dataset
    train(_cfg(ds, tmp_path))
    kw = dict(dataset=ds.dataset, backbone="unet", root_path=ds.root_path, list_dir=ds.list_dir,
              checkpoint_root=tmp_path / "ckpt", device="cpu")
    rep = run_evaluation(**kw)
    doc = json.loads((rep.output / "summary.json").read_text())
    del doc["meta"]["provenance"]
    (rep.output / "summary.json").write_text(json.dumps(doc))
    assert not run_evaluation(**kw).skipped


def test_version_is_dirty_for_changed_code_not_for_written_records(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    assert provenance.version_of(tmp_path) == "unknown"  # not a checkout
    git("init", "-q")
    git("config", "user.email", "t@example.org")
    git("config", "user.name", "t")
    (tmp_path / "results").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "results" / "r.json").write_text("{}")
    (tmp_path / "docs" / "RESULTS.md").write_text("a")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "c")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert provenance.version_of(tmp_path) == sha
    # a record written and its document rendered: the code is still the commit's
    (tmp_path / "results" / "r.json").write_text('{"n": 1}')
    (tmp_path / "docs" / "RESULTS.md").write_text("b")
    (tmp_path / "untracked.txt").write_text("scratch")
    assert provenance.version_of(tmp_path) == sha
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.version_of(tmp_path) == sha + "-dirty"
    # an untracked plug-in backbone is code too: its hash joins the version, and an edit changes it
    plugins = tmp_path / "networks" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "__init__.py").write_text("")
    git("add", "-A")
    git("commit", "-qm", "plugins folder")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert provenance.untracked_plugins(tmp_path) == {} and provenance.code_version_of(tmp_path) == sha
    (plugins / "my_net.py").write_text("WIDTH = 1\n")
    first = provenance.code_version_of(tmp_path)
    assert provenance.untracked_plugins(tmp_path) == {
        "networks/plugins/my_net.py": provenance.file_sha256(plugins / "my_net.py")}
    assert first.startswith(sha + "+plugins-") and provenance.version_of(tmp_path) == sha
    (plugins / "my_net.py").write_text("WIDTH = 2\n")
    assert provenance.code_version_of(tmp_path) != first
    # an editor's lock file (a dangling symlink) and macOS's ._ files are not plug-ins; a package is one
    (plugins / ".#my_net.py").symlink_to("nobody@host.1234")
    (plugins / "._my_net.py").write_bytes(b"resource fork")
    (plugins / "pkgnet").mkdir()
    (plugins / "pkgnet" / "__init__.py").write_text("from .net import *\n")
    assert sorted(provenance.untracked_plugins(tmp_path)) == ["networks/plugins/my_net.py",
                                                              "networks/plugins/pkgnet/__init__.py"]
    git("add", "-A")
    git("commit", "-qm", "the plug-in tracked")
    assert "+plugins" not in provenance.code_version_of(tmp_path)


def test_path_sha256_of_a_file_and_of_a_folder(tmp_path):
    (tmp_path / "s" / "sub").mkdir(parents=True)
    (tmp_path / "s" / "a.dcm").write_bytes(b"one")
    (tmp_path / "s" / "sub" / "b.dcm").write_bytes(b"two")
    assert provenance.path_sha256(tmp_path / "s" / "a.dcm") == provenance.file_sha256(tmp_path / "s" / "a.dcm")
    first = provenance.path_sha256(tmp_path / "s")
    (tmp_path / "t" / "sub").mkdir(parents=True)  # a copy elsewhere holds the same
    (tmp_path / "t" / "a.dcm").write_bytes(b"one")
    (tmp_path / "t" / "sub" / "b.dcm").write_bytes(b"two")
    assert provenance.path_sha256(tmp_path / "t") == first
    (tmp_path / "s" / "sub" / "b.dcm").write_bytes(b"tww")  # one file's bytes change
    assert provenance.path_sha256(tmp_path / "s") != first
    (tmp_path / "t" / "sub" / "b.dcm").rename(tmp_path / "t" / "sub" / "c.dcm")  # one file's name changes
    assert provenance.path_sha256(tmp_path / "t") != first
