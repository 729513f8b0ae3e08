"""scripts/mix_datasets.py: a real patient's slices mixed with phantom slices (sim_to_real.sh)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_tiny_dataset
from scripts.mix_datasets import build_mix, evenly_spaced, main, phantom_name
from trainer import TrainConfig, train
from utils.h5io import DatasetPaths, read_list, write_list


def test_evenly_spaced_worked_examples():
    items = list("abcdefghij")
    assert evenly_spaced(items, 5) == list("bdfhj")
    assert evenly_spaced(items, 2) == list("ej")
    assert evenly_spaced(items, 0) == []
    assert evenly_spaced(items, 10) == items and evenly_spaced(items, 50) == items
    # spread through the whole list, not its head
    picked = evenly_spaced([str(i) for i in range(100)], 7)
    assert len(picked) == 7 and int(picked[0]) < 15 and int(picked[-1]) == 99
    with pytest.raises(ValueError):
        evenly_spaced(items, -1)
    assert phantom_name("case0003_slice0010") == "ph0003_slice0010"
    with pytest.raises(ValueError, match="must start with 'case'"):
        phantom_name("ph0003")


@pytest.fixture
def two_sets(tmp_path):
    real = make_tiny_dataset(tmp_path / "real")
    phantom = make_tiny_dataset(tmp_path / "phantom")
    lists = tmp_path / "lists" / "train2"
    write_list(lists / "vol_train.txt", ["case0002"])
    write_list(lists / "vol_val.txt", ["case0002"])
    write_list(lists / "vol_test.txt", ["case0004"])
    return real, phantom, lists


def _build(tmp_path, real, phantom, lists):
    out = DatasetPaths(tmp_path / "mix" / "tiny", tmp_path / "mixlists" / "tiny")
    names = build_mix(out, DatasetPaths(real.paths.root, lists), read_list(real.paths.list_file("slice_train")),
                      phantom.paths)
    return out.root, names


def test_build_mix_links_real_and_renamed_phantom_files(tmp_path, two_sets):
    real, phantom, lists = two_sets
    out, names = _build(tmp_path, real, phantom, lists)
    real_names = [n for n in names if n.startswith("case")]
    ph_names = [n for n in names if n.startswith("ph")]
    # 12 slices of the training patient, as many phantom slices out of the phantoms' 36
    assert real_names == [f"case0002_slice{z:04d}" for z in range(12)] and len(ph_names) == 12
    assert {n.split("_slice")[0] for n in ph_names} == {"ph0001", "ph0002", "ph0003"}
    assert read_list(tmp_path / "mixlists" / "tiny" / "slice_train.txt") == names
    for split in ("vol_train", "vol_val", "vol_test"):
        assert read_list(tmp_path / "mixlists" / "tiny" / f"{split}.txt") == read_list(lists / f"{split}.txt")
    # every link resolves to the source file under its own or its renamed name
    link = out / "slice_data" / f"{ph_names[0]}.h5"
    assert link.is_symlink() and link.resolve() == (phantom.paths.root / "slice_data"
                                                    / f"case{ph_names[0][2:]}.h5").resolve()
    assert (out / "vol_data" / "case0004.h5").resolve() == real.paths.volume("case0004").resolve()
    assert (out / "vol_data" / "ph0003.h5").resolve() == phantom.paths.volume("case0003").resolve()
    assert not (out / "slice_data" / "case0001_slice0000.h5").exists()  # not the training patient
    # a second build is a no-op; a file in the way is an error, not overwritten
    assert _build(tmp_path, real, phantom, lists)[1] == names
    (out / "vol_data" / "ph0001.h5").unlink()
    (out / "vol_data" / "ph0001.h5").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="ph0001.h5: exists"):
        _build(tmp_path, real, phantom, lists)


@pytest.mark.parametrize("ratio,expected", [(0.0, 0), (0.5, 6), (2.0, 24), (10.0, 36)])
def test_phantom_ratio_sets_the_phantom_share(tmp_path, two_sets, ratio, expected):
    real, phantom, lists = two_sets
    out = DatasetPaths(tmp_path / "mix" / "tiny", tmp_path / "mixlists" / "tiny")
    names = build_mix(out, DatasetPaths(real.paths.root, lists), read_list(real.paths.list_file("slice_train")),
                      phantom.paths, phantom_ratio=ratio)
    # 12 real slices; the phantoms have 36 in all, so a share past 3x takes every one of them
    assert sum(n.startswith("case") for n in names) == 12
    assert sum(n.startswith("ph") for n in names) == expected
    with pytest.raises(ValueError, match="phantom_ratio"):
        build_mix(out, DatasetPaths(real.paths.root, lists), read_list(real.paths.list_file("slice_train")),
                  phantom.paths, phantom_ratio=-1)


def test_training_runs_on_the_mixed_folder(tmp_path, two_sets):
    real, phantom, lists = two_sets
    out, _ = _build(tmp_path, real, phantom, lists)
    cfg = TrainConfig(dataset="tiny", root_path=str(out.parent), list_dir=str(tmp_path / "mixlists"),
                      output_root=str(tmp_path / "ckpt"), model_kwargs={"base_channels": 4}, img_size=(16, 16),
                      target_spacing=1.6, batch_size=4, num_workers=0, max_epochs=1, max_iterations=2,
                      salience="offline", exp="mix")
    result = train(cfg)
    assert result.iteration == 2 and np.isfinite(result.losses).all()


def test_cli_missing_source_exits_2(tmp_path, two_sets, capsys):
    real, phantom, lists = two_sets
    args = ["--real_root", str(real.paths.root), "--real_list_dir", str(lists),
            "--real_slices", str(real.paths.list_file("slice_train")), "--phantom_root", str(tmp_path / "nowhere"),
            "--phantom_list_dir", str(phantom.list_dir / "tiny"), "--out", str(tmp_path / "m"),
            "--out_list_dir", str(tmp_path / "ml")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists() and not (tmp_path / "ml").exists()  # nothing half-written


def _manifest(ds, classes):
    from utils.manifests import case_record, dataset_manifest, write_dataset_manifest

    cases = {c: case_record(ds.paths.volume(c)) for names in ds.splits.values() for c in names}
    write_dataset_manifest(ds.paths, dataset_manifest(
        "tiny", source=str(ds.paths.root), input_format="dicom", vessel_classes=classes, hu_window=(0, 400),
        crop="none", margin=0, with_masks=True, cases=cases))


def test_mixed_folder_gets_a_merged_manifest_and_refuses_other_labels(tmp_path, two_sets):
    import json

    from utils.manifests import fingerprint

    real, phantom, lists = two_sets
    _manifest(real, ["liver"])
    _manifest(phantom, ["liver"])
    out, _ = _build(tmp_path, real, phantom, lists)
    doc = json.loads((out / "dataset.json").read_text())
    real_doc = json.loads((real.paths.root / "dataset.json").read_text())
    assert doc["vessel_classes"] == ["liver"] and doc["dataset"] == "tiny"
    # the real cases of the lists under their names, the phantom training cases renamed
    assert sorted(doc["cases"]) == ["case0002", "case0004", "ph0001", "ph0002", "ph0003"]
    assert doc["cases"]["ph0003"] == json.loads((phantom.paths.root / "dataset.json").read_text())["cases"]["case0003"]
    assert doc["mixed_from"]["real"] == fingerprint(real_doc)
    # a vessel-labelled phantom set cannot be mixed into a liver-labelled real one
    _manifest(phantom, ["portalvein", "venoussystem"])
    with pytest.raises(ValueError, match="vessel_classes .* cannot be mixed"):
        build_mix(DatasetPaths(tmp_path / "mix2" / "tiny", tmp_path / "mixlists2" / "tiny"),
                  DatasetPaths(real.paths.root, lists), read_list(real.paths.list_file("slice_train")),
                  phantom.paths)


def _maps_of_one_head(real, phantom, phantom_in_progress: bool = False) -> None:
    """Both sets with a dataset.json and maps' manifests of one bank head ("abc")."""
    import json

    from utils.manifests import salience_manifest, write_salience_manifest

    _manifest(real, ["portalvein", "venoussystem"])
    _manifest(phantom, ["portalvein", "venoussystem"])
    for ds in (real, phantom):
        doc = json.loads((ds.paths.root / "dataset.json").read_text())
        write_salience_manifest(ds.paths, {**salience_manifest(
            kind="bank", parameters={}, weights_sha256="abc", weights_path=None, normalisation="fixed", dataset=doc,
            cases={c: [3, 8, 8, 4] for c in doc["cases"]}), **({"in_progress": True} if (
                phantom_in_progress and ds is phantom) else {})})


def test_mixed_folder_carries_one_generator_or_refuses_two(tmp_path, two_sets):
    import json

    from utils.manifests import fingerprint, salience_manifest, write_salience_manifest

    real, phantom, lists = two_sets
    _maps_of_one_head(real, phantom)
    out, _ = _build(tmp_path, real, phantom, lists)
    sal = json.loads((out / "vol_salience" / "manifest.json").read_text())
    mixed = json.loads((out / "dataset.json").read_text())
    assert sal["dataset_fingerprint"] == fingerprint(mixed) and sal["generator"]["weights_sha256"] == "abc"
    assert sorted(sal["cases"]) == sorted(mixed["cases"])
    # maps of another head: refused, naming both manifests
    doc = json.loads((phantom.paths.root / "dataset.json").read_text())
    write_salience_manifest(phantom.paths, salience_manifest(
        kind="bank", parameters={}, weights_sha256="other", weights_path=None, normalisation="fixed", dataset=doc,
        cases={c: [3, 8, 8, 4] for c in doc["cases"]}))
    with pytest.raises(ValueError, match="generator weights 'other' differs"):
        build_mix(DatasetPaths(tmp_path / "mix3" / "tiny", tmp_path / "mixlists3" / "tiny"),
                  DatasetPaths(real.paths.root, lists), read_list(real.paths.list_file("slice_train")),
                  phantom.paths)


def test_maps_of_a_stopped_salience_run_are_not_mixed(tmp_path, two_sets):
    real, phantom, lists = two_sets
    _maps_of_one_head(real, phantom, phantom_in_progress=True)
    with pytest.raises(ValueError, match="vol_salience/manifest.json: salience_generation.py did not finish"):
        _build(tmp_path, real, phantom, lists)
