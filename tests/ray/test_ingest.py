"""Ray tests: ingest the three small layouts end to end on a real local Ray, then stream batches from the shards."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
import torch

from pipelines.config import load_config
from pipelines.data.datasets.pneumonia import CLASSES as PNEUMONIA_CLASSES
from pipelines.data.ingest import ingest
from pipelines.data.streaming import iter_training_batches, split_datasets
from tests.helpers import SPACES, write_layouts

SOURCES = ("nih", "covid", "pneumonia")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("ingest")
    planted = write_layouts(root)
    cfg = load_config(None, sets=["data.storage_size=32", "model.input_size=32", "data.rows_per_shard=8"])
    manifest = ingest(cfg, _roots(root), root / "shards")
    return cfg, root, planted, manifest


def _roots(root):
    return {source: root / source for source in SOURCES}


def _rows(root):
    tables = [pq.read_table(p) for p in sorted((root / "shards").glob("*/*.parquet"))]
    return [row for table in tables for row in table.to_pylist()]


def test_every_input_file_is_a_row_or_a_reject(ingested):
    _, root, planted, manifest = ingested
    rows = _rows(root)
    with open(root / "shards" / "rejects.csv") as handle:
        rejects = list(csv.DictReader(handle))
    planted_files = planted["nih_images"] + planted["covid_images"] + planted["pneumonia_images"]
    assert len(rows) + len(rejects) == planted_files == manifest["input_files"]
    by_name = {r["relpath"].split("/")[-1]: r["reason"] for r in rejects}
    assert by_name == {
        planted["corrupt"]["empty"]: "empty",
        planted["corrupt"]["truncated"]: "truncated",
        planted["corrupt"]["not_an_image"]: "not_an_image",
        planted["bad_label"]: "bad_label",
        planted["not_in_csv"]: "not_in_csv",
        planted["pneumonia_bad_name"].split("/")[-1]: "bad_label",
    }
    assert manifest["label_rows_without_image"] == {"nih": 1, "covid": 0, "pneumonia": 0}


def test_shard_rows_have_the_documented_columns(ingested):
    _, root, _, manifest = ingested
    rows = _rows(root)
    nih = next(r for r in rows if r["source"] == "nih")
    covid = next(r for r in rows if r["source"] == "covid")
    assert len(nih["labels"]) == 14 and len(covid["labels"]) == 1 and 0 <= covid["labels"][0] < 4
    for key in ("image", "patient_id", "split", "view_position", "age", "sex", "original_width", "phash", "relpath"):
        assert key in nih
    modes = {r["decoded_mode"] for r in rows}
    assert {"I;16", "RGBA", "L"} <= modes or {"I", "RGBA", "L"} <= modes
    assert manifest["label_spaces"] == [space.to_dict() for space in SPACES]
    assert set(manifest["positive_weights"]) == {"nih14"}  # multi-label heads only
    assert set(manifest["positive_weights"]["nih14"]) == set(SPACES[0].classes)
    assert json.loads((root / "shards" / "manifest.json").read_text())["images"] == manifest["images"]


def test_no_patient_or_twin_crosses_splits(ingested):
    _, root, planted, manifest = ingested
    rows = _rows(root)
    split_of_patient = {}
    for row in rows:
        split_of_patient.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_patient.values())
    split_of = {(r["source"], r["relpath"]): r["split"] for r in rows}
    nih_twin, covid_twin = planted["twin"]
    assert manifest["twins"] >= 1
    assert split_of[("covid", covid_twin)] == split_of[("nih", nih_twin)] == "test"
    twins = json.loads((root / "shards" / "twins.json").read_text())
    pairs = {(t["kept_source"], t["moved_source"]) for t in twins}
    assert pairs == {("nih", "covid"), ("covid", "pneumonia")}
    covid_image, kermany_image = planted["covid_pneumonia_twin"]
    assert split_of[("pneumonia", kermany_image)] == split_of[("covid", covid_image)]


def test_kermany_rows_keep_the_official_test_and_their_classes(ingested):
    _, root, _, manifest = ingested
    rows = [r for r in _rows(root) if r["source"] == "pneumonia"]
    for row in rows:
        official_test = row["relpath"].startswith("test/")
        assert (row["split"] == "test") == official_test, row["relpath"]
        kind = PNEUMONIA_CLASSES[row["labels"][0]]
        assert ("NORMAL" in row["relpath"]) == (kind == "normal")
        assert ("virus" in row["relpath"]) == (kind == "viral")
    assert manifest["class_counts"]["pneumonia"]["test"] == {"normal": 8, "bacterial": 8, "viral": 8}
    assert manifest["images"]["pneumonia"]["val"] > 0  # a patient-grouped part of train


def test_rerun_refuses_then_overwrites(ingested):
    cfg, root, _, manifest = ingested
    with pytest.raises(FileExistsError, match="--overwrite"):
        ingest(cfg, _roots(root), root / "shards")
    again = ingest(cfg, _roots(root), root / "shards", overwrite=True)
    assert again["images"] == manifest["images"]
    assert len(_rows(root)) == sum(sum(v.values()) for v in manifest["images"].values())


def test_stream_batches_of_the_right_shape_and_dtype(ingested):
    cfg, root, _, _ = ingested
    datasets = split_datasets(cfg, root / "shards")
    assert set(datasets) == {"train", "val", "test"}
    batch = next(iter(iter_training_batches(datasets["train"], batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["label_nih14"].shape == (4, 14) and batch["label_nih14"].dtype == torch.float32
    assert batch["source"].dtype == torch.int64 and set(batch["source"].tolist()) <= {0, 1, 2}
    for index, head in ((1, "covid"), (2, "pneumonia")):
        labels, own = batch[f"label_{head}"], batch["source"] == index
        assert labels.dtype == torch.int64 and torch.all(labels[~own] == -1) and torch.all(labels[own] >= 0)
    assert torch.all(batch["label_nih14"][batch["source"] != 0] == 0)
    total = sum(int(b["image"].shape[0]) for b in iter_training_batches(datasets["val"], batch_size=3))
    assert total == sum(1 for r in _rows(root) if r["split"] == "val")
