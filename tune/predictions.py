"""A checkpoint's predictions on a split, computed once and cached as parquet beside the checkpoint.

The ensemble sweep evaluates hundreds of (weight, threshold) points; none of them needs a forward pass once the
CNN's and the ViT's probabilities are at hand. The table holds ``source`` (the index of each row's head), every
head's probabilities (a fixed-size list column named by the head) and labels (``label_<head>``: a 0/1 list of a
multi-label head, the class index of a multi-class one), with the label spaces as JSON in the schema metadata, so
a reader rebuilds both the arrays and the heads. The cache is keyed by the shards it was computed on (the ingest
manifest's creation time and the file names) and the checkpoint's heads, so re-ingesting invalidates it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.checkpoint import META_FILE, label_spaces_of
from models.labels import LabelSpace, label_key, spaces_from_dicts
from pipelines.config import Config
from pipelines.data.shards import load_manifest, shard_files
from pipelines.evaluate.inference import predict_checkpoint

log = logging.getLogger(__name__)
CACHE_KEY = b"cxr.predictions_key"
SPACES_KEY = b"cxr.label_spaces"


def cache_path(checkpoint_dir: str | Path, split: str) -> Path:
    return Path(checkpoint_dir) / f"predictions-{split}.parquet"


def _key(cfg: Config, files: list[str], spaces: Sequence[LabelSpace]) -> str:
    manifest = load_manifest(cfg.data.shards_dir)
    return json.dumps(
        {
            "shards": manifest.get("created"),
            "files": [Path(f).name for f in files],
            "heads": [space.to_dict() for space in spaces],
        }
    )


def _list_column(values: np.ndarray, dtype: type) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def to_table(pred: dict[str, np.ndarray], spaces: Sequence[LabelSpace]) -> pa.Table:
    """The predictions as a table whose metadata carries the label spaces (``from_table`` reads both back)."""
    columns = {"source": pa.array(np.asarray(pred["source"]).astype(np.int8))}
    for space in spaces:
        columns[space.head] = _list_column(pred[space.head], np.float32)
        labels = np.asarray(pred[label_key(space.head)])
        if space.multi_label:
            columns[label_key(space.head)] = _list_column(labels, np.float32)
        else:
            columns[label_key(space.head)] = pa.array(labels.astype(np.int16))
    spaces_json = json.dumps([space.to_dict() for space in spaces]).encode()
    return pa.table(columns).replace_schema_metadata({SPACES_KEY: spaces_json})


def _list_values(column: pa.ChunkedArray) -> np.ndarray:
    column = column.combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def from_table(table: pa.Table) -> tuple[dict[str, np.ndarray], tuple[LabelSpace, ...]]:
    """The predictions and label spaces ``to_table`` stored."""
    spaces = spaces_from_dicts(json.loads((table.schema.metadata or {})[SPACES_KEY]))
    pred = {"source": table["source"].to_numpy()}
    for space in spaces:
        pred[space.head] = _list_values(table[space.head])
        key = label_key(space.head)
        pred[key] = _list_values(table[key]) if space.multi_label else table[key].to_numpy()
    return pred, spaces


def split_predictions(
    cfg: Config, checkpoint_dir: str | Path, split: str
) -> tuple[dict[str, np.ndarray], tuple[LabelSpace, ...]]:
    """Every head's probabilities and labels for every row of ``split``, from cache if valid, and the checkpoint's
    label spaces (head order: ``source`` indexes them)."""
    files = shard_files(cfg.data.shards_dir, split)
    spaces = label_spaces_of(json.loads((Path(checkpoint_dir) / META_FILE).read_text()))
    key = _key(cfg, files, spaces)
    path = cache_path(checkpoint_dir, split)
    if path.is_file():
        table = pq.read_table(path)
        if (table.schema.metadata or {}).get(CACHE_KEY, b"").decode() == key:
            return from_table(table)
        log.info("%s was computed on other shards or heads; recomputing", path)
    log.info("predicting the %s split with %s", split, checkpoint_dir)
    pred = predict_checkpoint(cfg, checkpoint_dir, files)
    table = to_table(pred, spaces)
    table = table.replace_schema_metadata({**table.schema.metadata, CACHE_KEY: key.encode()})
    partial = path.with_suffix(".parquet.partial")
    pq.write_table(table, partial)
    partial.replace(path)
    return pred, spaces
