"""A checkpoint's predictions on a split, computed once and cached as parquet beside the checkpoint.

The ensemble sweep evaluates hundreds of (weight, threshold) points; none of them needs a forward pass once the
CNN's and the ViT's probabilities are at hand. The cache is keyed by the shards it was computed on (the ingest
manifest's creation time and the file names), so re-ingesting invalidates it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import Config
from pipelines.data.shards import load_manifest, shard_files
from pipelines.evaluate.inference import predict_checkpoint

log = logging.getLogger(__name__)
CACHE_KEY = b"cxr.predictions_key"
ARRAY_COLUMNS = ("nih14", "covid", "nih_labels")


def cache_path(checkpoint_dir: str | Path, split: str) -> Path:
    return Path(checkpoint_dir) / f"predictions-{split}.parquet"


def _key(cfg: Config, files: list[str]) -> str:
    manifest = load_manifest(cfg.data.shards_dir)
    return json.dumps({"shards": manifest.get("created"), "files": [Path(f).name for f in files]})


def to_table(pred: dict[str, np.ndarray]) -> pa.Table:
    columns = {
        "source": pa.array(pred["source"].astype(np.int8)),
        "covid_label": pa.array(pred["covid_label"].astype(np.int16)),
    }
    for name in ARRAY_COLUMNS:
        values = np.ascontiguousarray(pred[name], dtype=np.float32)
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
    return pa.table(columns)


def from_table(table: pa.Table) -> dict[str, np.ndarray]:
    pred = {"source": table["source"].to_numpy(), "covid_label": table["covid_label"].to_numpy()}
    for name in ARRAY_COLUMNS:
        column = table[name].combine_chunks()
        pred[name] = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    return pred


def split_predictions(cfg: Config, checkpoint_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """Probabilities (nih14 sigmoid, covid softmax) and labels for every row of ``split``, from cache if valid."""
    files = shard_files(cfg.data.shards_dir, split)
    key = _key(cfg, files)
    path = cache_path(checkpoint_dir, split)
    if path.is_file():
        table = pq.read_table(path)
        if (table.schema.metadata or {}).get(CACHE_KEY, b"").decode() == key:
            return from_table(table)
        log.info("%s was computed on other shards; recomputing", path)
    log.info("predicting the %s split with %s", split, checkpoint_dir)
    pred = predict_checkpoint(cfg, checkpoint_dir, files)
    table = to_table(pred).replace_schema_metadata({CACHE_KEY: key.encode()})
    partial = path.with_suffix(".parquet.partial")
    pq.write_table(table, partial)
    partial.replace(path)
    return pred
