"""Ray tests: ingest a small set end to end on a real local Ray, then stream batches from the shards."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
import torch

from pipelines.config import load_config
from pipelines.data.ingest import ingest
from pipelines.data.streaming import iter_training_batches, split_datasets
from tests.helpers import write_layouts

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("ingest")
    planted = write_layouts(root)
    cfg = load_config(None, sets=["data.storage_size=32", "model.input_size=32", "data.rows_per_shard=8"])
    manifest = ingest(cfg, root / "nih", root / "covid", root / "shards")
    return cfg, root, planted, manifest


def _rows(root):
    tables = [pq.read_table(p) for p in sorted((root / "shards").glob("*/*.parquet"))]
    return [row for table in tables for row in table.to_pylist()]


def test_every_input_file_is_a_row_or_a_reject(ingested):
    _, root, planted, manifest = ingested
    rows = _rows(root)
    with open(root / "shards" / "rejects.csv") as handle:
        rejects = list(csv.DictReader(handle))
    assert len(rows) + len(rejects) == planted["nih_images"] + planted["covid_images"] == manifest["input_files"]
    by_name = {r["relpath"].split("/")[-1]: r["reason"] for r in rejects}
    assert by_name == {
        planted["corrupt"]["empty"]: "empty",
        planted["corrupt"]["truncated"]: "truncated",
        planted["corrupt"]["not_an_image"]: "not_an_image",
        planted["bad_label"]: "bad_label",
        planted["not_in_csv"]: "not_in_csv",
    }
    assert manifest["nih_csv_rows_without_image"] == 1


def test_shard_rows_have_the_documented_columns(ingested):
    _, root, _, manifest = ingested
    rows = _rows(root)
    nih = next(r for r in rows if r["source"] == "nih")
    covid = next(r for r in rows if r["source"] == "covid")
    assert len(nih["nih_labels"]) == 14 and nih["covid_label"] is None
    assert covid["nih_labels"] is None and 0 <= covid["covid_label"] < 4
    for key in ("image", "patient_id", "split", "view_position", "age", "sex", "original_width", "phash", "relpath"):
        assert key in nih
    modes = {r["decoded_mode"] for r in rows}
    assert {"I;16", "RGBA", "L"} <= modes or {"I", "RGBA", "L"} <= modes
    assert set(manifest["positive_weights"]) == set(manifest["label_spaces"]["nih14"])
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


def test_rerun_refuses_then_overwrites(ingested):
    cfg, root, _, manifest = ingested
    with pytest.raises(FileExistsError, match="--overwrite"):
        ingest(cfg, root / "nih", root / "covid", root / "shards")
    again = ingest(cfg, root / "nih", root / "covid", root / "shards", overwrite=True)
    assert again["images"] == manifest["images"]
    assert len(_rows(root)) == sum(sum(v.values()) for v in manifest["images"].values())


def test_stream_batches_of_the_right_shape_and_dtype(ingested):
    cfg, root, _, _ = ingested
    datasets = split_datasets(cfg, root / "shards")
    assert set(datasets) == {"train", "val", "test"}
    batch = next(iter(iter_training_batches(datasets["train"], batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["nih_labels"].shape == (4, 14) and batch["nih_labels"].dtype == torch.float32
    assert batch["covid_label"].dtype == torch.int64 and batch["source"].dtype == torch.int64
    is_nih = batch["source"] == 0
    assert torch.all(batch["covid_label"][is_nih] == -1) and torch.all(batch["covid_label"][~is_nih] >= 0)
    assert torch.all(batch["nih_labels"][~is_nih] == 0)
    total = sum(int(b["image"].shape[0]) for b in iter_training_batches(datasets["val"], batch_size=3))
    assert total == sum(1 for r in _rows(root) if r["split"] == "val")
