"""Kermany's pneumonia layout: file names to classes and patients (real names), splits, rejects."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from models.labels import LabelError
from pipelines.data.datasets import DatasetLayoutError
from pipelines.data.datasets.pneumonia import (
    CLASSES,
    LABEL_SPACE,
    list_pneumonia,
    parse_file_name,
    pneumonia_splits,
)


def test_real_kermany_samples_get_their_labels_and_patients(real_samples):
    listing = list_pneumonia(real_samples / "kermany")
    truth = {row["path"]: row for row in csv.DictReader((real_samples / "kermany" / "labels.csv").open())}
    assert len(listing.rows) == len(truth) == 50 and not listing.rejects
    subtype = {"normal": "normal", "bacteria": "bacterial", "virus": "viral"}
    for row in listing.rows:
        assert CLASSES[row["labels"][0]] == subtype[truth[row["relpath"]]["subtype"]], row["relpath"]
    assert Counter(CLASSES[r["labels"][0]] for r in listing.rows) == {"normal": 25, "bacterial": 13, "viral": 12}
    # the same grouping into patients as the sample's own table: one patient id of ours per patient of theirs
    pairs = {(r["patient_id"], truth[r["relpath"]]["patient"]) for r in listing.rows}
    assert len(pairs) == len({ours for ours, _ in pairs}) == len({theirs for _, theirs in pairs})


@pytest.mark.parametrize(
    ("name", "folder", "patient", "label"),
    [
        ("person1_bacteria_1.jpeg", "PNEUMONIA", "pneumonia-person1", "bacterial"),
        ("person1_virus_6.jpeg", "PNEUMONIA", "pneumonia-person1", "viral"),
        ("person1000_virus_1681.jpeg", "PNEUMONIA", "pneumonia-person1000", "viral"),
        ("IM-0115-0001.jpeg", "NORMAL", "pneumonia-IM-0115", "normal"),
        ("NORMAL2-IM-0246-0001-0002.jpeg", "NORMAL", "pneumonia-NORMAL2-IM-0246", "normal"),
    ],
)
def test_file_names(name, folder, patient, label):
    assert parse_file_name(name, folder) == (patient, CLASSES.index(label))


@pytest.mark.parametrize(
    ("name", "folder"),
    [("person3_bacteria_10.jpeg", "NORMAL"), ("IM-0001-0001.jpeg", "PNEUMONIA"), ("x.jpeg", "OTHER")],
)
def test_names_that_contradict_their_folder_are_refused(name, folder):
    with pytest.raises(LabelError, match=name.split(".")[0] if folder != "OTHER" else "OTHER"):
        parse_file_name(name, folder)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8")  # only listed here, never decoded


def test_official_layout_keeps_test_and_merges_val_into_the_pool(tmp_path):
    root = tmp_path / "chest_xray"
    for p in range(40):
        _touch(root / "train" / "PNEUMONIA" / f"person{p}_bacteria_{2 * p}.jpeg")
        _touch(root / "train" / "PNEUMONIA" / f"person{p}_virus_{2 * p + 1}.jpeg")  # a patient's second image
        _touch(root / "train" / "NORMAL" / f"IM-{p:04d}-0001.jpeg")
    _touch(root / "val" / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg")
    _touch(root / "test" / "PNEUMONIA" / "person500_virus_900.jpeg")
    _touch(root / "test" / "NORMAL" / "notes.txt")
    _touch(root / "test" / "NORMAL" / "scan.jpeg")
    listing = list_pneumonia(tmp_path)  # the folder holding chest_xray/
    assert {r["reason"] for r in listing.rejects} == {"wrong_type", "bad_label"} and len(listing.rejects) == 2
    assert len(listing.rows) == 122
    split = pneumonia_splits(listing.rows, val_fraction=0.25, test_fraction=0.2, seed=0)
    assert split["test/PNEUMONIA/person500_virus_900.jpeg"] == "test"
    assert Counter(split.values())["test"] == 1  # the official test only: nothing carved from train
    sides = {}
    for row in listing.rows:
        sides.setdefault(row["patient_id"], set()).add(split[row["relpath"]])
    assert all(len(s) == 1 for s in sides.values()), "a patient on two sides"
    assert 0 < Counter(split.values())["val"] < 122 and split == pneumonia_splits(listing.rows, 0.25, 0.2, seed=0)


def test_class_folders_alone_are_one_pool_split_by_patient(tmp_path):
    for p in range(50):
        _touch(tmp_path / "PNEUMONIA" / f"person{p}_virus_{p}.jpeg")
    listing = list_pneumonia(tmp_path)
    counts = Counter(pneumonia_splits(listing.rows, val_fraction=0.1, test_fraction=0.2, seed=1).values())
    assert counts == {"train": 35, "val": 5, "test": 10}


def test_missing_or_empty_roots_fail_with_the_path(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        list_pneumonia(tmp_path / "nope")
    (tmp_path / "train" / "other").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no NORMAL or PNEUMONIA"):
        list_pneumonia(tmp_path)


def test_binary_answer_adds_the_two_pneumonia_classes():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    np.testing.assert_allclose(LABEL_SPACE.binary_probability(probs), [0.3, 0.9])
    assert LABEL_SPACE.binary_target(np.array([0, 1, 2])).tolist() == [False, True, True]
