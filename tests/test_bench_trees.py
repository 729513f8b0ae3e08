"""bench/tree_scores.py: rows from test.py reports, one binary model for all rows or one per row;
bench/tree_contacts.py: pieces and contact places of two trees worked out on lines of voxels."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from scipy import ndimage

from bench.tree_contacts import CLASSES, patient_contacts, table, tree_contacts
from bench.tree_scores import table_rows
from inference.tree_model import TreeModel, TreeModelConfig
from preprocessing.dicom_reader import read_dicom_patient


def _report(folder: Path, dice: float, portal: Optional[float] = None, cases: tuple = ("case0001",)) -> str:
    folder.mkdir(parents=True)
    metrics = {"dice": {"mean": dice}, "cldice": {"mean": dice + 0.05}}
    if portal is not None:
        metrics.update(portal_dice={"mean": portal}, hepatic_dice={"mean": 0.5},
                       wrong_tree_share_voxelwise={"mean": 0.2}, wrong_tree_share={"mean": 0.1})
    meta = {"model_sha256": f"sha{dice}", "salience": "offline", "cases": list(cases), "eval_roi": "liver"}
    (folder / "summary.json").write_text(json.dumps({"meta": meta, "metrics": metrics}))
    return str(folder)


def test_one_binary_report_heads_the_rows(tmp_path):
    b = _report(tmp_path / "b", 0.6)
    t1, t2 = _report(tmp_path / "t1", 0.55, 0.1), _report(tmp_path / "t2", 0.5, 0.2)
    rows = table_rows([b], [t1, t2], ["a", "c"])
    assert list(rows) == ["binary", "a", "c"]
    assert rows["binary"]["dice"] == 0.6 and rows["binary"]["portal_dice"] != rows["binary"]["portal_dice"]  # NaN
    assert rows["c"]["portal_dice"] == 0.2


def test_one_binary_report_per_row_is_paired_in_order(tmp_path):
    b7, b1 = _report(tmp_path / "b7", 0.61, cases=["case0007"]), _report(tmp_path / "b1", 0.62)
    t = [_report(tmp_path / f"t{i}", 0.5 + i / 100, 0.1) for i in range(3)]
    rows = table_rows([b7, b7, b1], t, ["a on 7", "b on 7", "a on 1"])
    # rows on the same cases share one binary row
    assert list(rows) == ["binary (case0007)", "a on 7", "b on 7", "binary (case0001)", "a on 1"]
    assert rows["binary (case0001)"]["dice"] == 0.62 and rows["a on 1"]["dice"] == 0.52


def test_two_rows_of_one_name_are_refused(tmp_path):
    # one would overwrite the other in the table and the record
    b7, b1 = _report(tmp_path / "b7", 0.61, cases=["case0007"]), _report(tmp_path / "b1", 0.62)
    t = [_report(tmp_path / f"t{i}", 0.5 + i / 100, 0.1) for i in range(3)]
    with pytest.raises(ValueError, match="--names must be different"):
        table_rows([b7, b7, b1], t, ["a", "b", "a"])


def test_two_binary_models_on_the_same_cases_are_refused(tmp_path):
    # the shared row could only show one of them: the other's rows would sit under the wrong one
    b, other = _report(tmp_path / "b", 0.61), _report(tmp_path / "o", 0.64)
    t = [_report(tmp_path / f"t{i}", 0.5, 0.1) for i in range(2)]
    with pytest.raises(ValueError, match="another binary model"):
        table_rows([b, other], t, ["x", "y"])


def test_mismatched_counts_and_missing_reports_are_refused(tmp_path):
    b = [_report(tmp_path / f"b{i}", 0.6) for i in range(2)]
    t = [_report(tmp_path / f"t{i}", 0.5, 0.1) for i in range(3)]
    with pytest.raises(ValueError, match="one per --trees"):
        table_rows(b, t, ["x", "y", "z"])
    with pytest.raises(ValueError, match="summary.json: not a test.py report"):
        table_rows([b[0]], [str(tmp_path / "nowhere")], ["x"])



def test_tree_contacts_counts_pieces_and_the_places_where_two_trees_touch():
    c = np.zeros((40, 40, 20), np.uint8)
    c[5:35, 10, 10] = 1  # a portal line along the rows: 30 voxels
    c[20, 3:30, 10] = 2  # a hepatic line across it ...
    c[20, 10, 10] = 1    # ... whose crossing voxel both claim: portal (the overlap rule)
    r = tree_contacts(c)
    assert (r["portal_voxels"], r["hepatic_voxels"]) == (30, 26)
    assert (r["portal_pieces"], r["hepatic_pieces"]) == (1, 2)  # the crossing cuts the hepatic line
    assert r["union_pieces"] == 1 and r["mixed_pieces"] == 1
    # portal (19..21, 10) and hepatic (20, 9), (20, 11) are 26-adjacent across the crossing: one place
    assert r["contact_places"] == 1 and r["contact_voxels"] == 5
    assert r["piece_rule_wrong"] == pytest.approx(26 / 56)  # the one piece goes portal
    # a hepatic line in another slice touches nothing: a piece of its own, one tree only
    c[5:35, 12, 14] = 2
    r = tree_contacts(c)
    assert (r["union_pieces"], r["mixed_pieces"], r["contact_places"]) == (2, 1, 1)
    assert r["piece_rule_wrong"] == pytest.approx(26 / 86)
    # a hepatic branch ending beside the portal line at row 30: a second place, 3 + 1 more voxels
    c[30, 3:10, 10] = 2
    r = tree_contacts(c)
    assert r["contact_places"] == 2 and r["contact_voxels"] == 9 and r["union_pieces"] == 2
    # separate trees: no contact, every piece one tree
    sep = np.zeros_like(c)
    sep[5:35, 10, 10], sep[5:35, 20, 10] = 1, 2
    assert tree_contacts(sep)["contact_places"] == 0 and tree_contacts(sep)["piece_rule_wrong"] == 0.0
    lines = table({"phantom 1": r, "phantom 2": tree_contacts(sep), "real 1": r})
    # r: 4 hepatic pieces, and its mixed piece now holds 33 hepatic voxels to 30 portal: 30 / 93 wrong
    assert r["hepatic_pieces"] == 4 and r["piece_rule_wrong"] == pytest.approx(30 / 93)
    assert len(lines) == 6 and lines[-1] == "| phantoms, mean of 2 | 1 | 2.5 | 2 | 0.5 | 1 | 4.5 | 16.1% |"
    with pytest.raises(ValueError, match=r"\(H, W, D\)"):
        tree_contacts(c[0])
    with pytest.raises(ValueError, match="0, 1 and 2"):
        tree_contacts(c + 1)


def test_tree_contacts_scores_a_method_given_the_true_union():
    c = np.zeros((20, 20, 4), np.uint8)
    c[2:18, 5, 1] = 1   # 16 portal voxels
    c[2:12, 9, 1] = 2   # 10 hepatic voxels
    labels = np.where(c > 0, 2, 0)  # everything hepatic: the portal tree is wrong
    r = tree_contacts(c, labels)
    assert r["tree_model_wrong"] == pytest.approx(16 / 26)
    assert tree_contacts(c, c)["tree_model_wrong"] == 0.0
    labels[0, 0, 0] = 1  # outside the union: not counted
    assert tree_contacts(c, labels)["tree_model_wrong"] == pytest.approx(16 / 26)
    # the column shows only when every row has it
    assert "tree model" in table({"phantom 1": r})[0]
    assert "tree model" not in table({"phantom 1": r, "real 1": tree_contacts(c)})[0]
    with pytest.raises(ValueError, match="differ in shape"):
        tree_contacts(c, labels[:-1])


def test_patient_contacts_gives_the_tree_model_the_windowed_scan_and_the_true_union(tree_data):
    seen = {}

    class Known(TreeModel):  # a stand-in tree model whose logit is known
        def hepatic_minus_portal(self, image, union, spacing):
            seen.update(lo=float(image.min()), hi=float(image.max()), n=int(union.sum()), spacing=tuple(spacing))
            logit = np.where(union, 20.0, 0.0)  # surely hepatic ...
            # ... but for the voxel with the most neighbours in the mask, a little portal: voxel by voxel
            # it is portal, and the cut gives it to the hepatic tree around it
            neighbours = ndimage.convolve(union.astype(int), np.ones((3, 3, 3), int), mode="constant")
            seen["odd"] = np.unravel_index(np.argmax(np.where(union, neighbours, -1)), union.shape)
            logit[seen["odd"]] = -0.5
            return logit

    patient = sorted((tree_data / "raw").glob("3Dircadb1.*"))[0]
    r = patient_contacts(patient, Known(None, TreeModelConfig()))
    n = r["portal_voxels"] + r["hepatic_voxels"]
    assert seen["n"] == n > 0 and 0.0 <= seen["lo"] < seen["hi"] <= 1.0 and len(seen["spacing"]) == 3
    truth = read_dicom_patient(patient, CLASSES, classes=CLASSES).classes
    odd_is_portal = truth[seen["odd"]] == 1
    assert r["tree_model_wrong"] == pytest.approx((r["portal_voxels"] + (-1 if odd_is_portal else 1)) / n)
    assert r["tree_model_cut_wrong"] == pytest.approx(r["portal_voxels"] / n)
    assert "tree_model_wrong" not in patient_contacts(patient)
