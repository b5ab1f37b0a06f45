"""The parquet shards ingest wrote, read without Ray: where they are, the manifest, and local batches.

Evaluation, export, the serving smoke client and the single-process baseline of ``cxr bench data`` read shards in
this process; training streams them through Ray Data (``pipelines/data/streaming.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.errors import CxrError
from models.labels import LabelSpace, spaces_from_dicts
from pipelines.config import Config
from pipelines.data.transforms import TransformSpec, preprocess_table

SHARD_COLUMNS = ["image", "source", "labels", "age", "sex", "view_position"]


class ShardsNotFoundError(CxrError, FileNotFoundError):
    """The shards folder lacks a split or its manifest (run ``cxr ingest`` first)."""


def load_manifest(shards_dir: str | Path) -> dict[str, Any]:
    path = Path(shards_dir) / "manifest.json"
    if not path.is_file():
        raise ShardsNotFoundError(f"{path} not found: run `cxr ingest` to write shards to {shards_dir}")
    return json.loads(path.read_text())


def manifest_label_spaces(shards_dir: str | Path) -> tuple[LabelSpace, ...]:
    """The label spaces of the datasets these shards hold, in head order: the heads a model trained on them gets."""
    manifest = load_manifest(shards_dir)
    spaces = manifest.get("label_spaces")
    if not isinstance(spaces, list):
        raise ShardsNotFoundError(
            f"{shards_dir}/manifest.json predates the dataset registry (no label_spaces list): run `cxr ingest` again"
        )
    return spaces_from_dicts(spaces)


def shard_files(shards_dir: str | Path, split: str) -> list[str]:
    folder = Path(shards_dir) / split
    files = sorted(str(p) for p in folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise ShardsNotFoundError(f"{folder}: no parquet shards for split {split!r}; run `cxr ingest` first")
    return files


def local_batches(
    files: list[str], transform: TransformSpec | Config, train: bool, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The same preprocessing in this process, in shard order, without Ray: evaluation (whose TTA passes must
    line up row by row), export's parity batches and the single-process baseline of ``cxr bench data``."""
    if isinstance(transform, TransformSpec):
        spec = transform
    else:  # the heads are those of the shards' manifest (<shards_dir>/<split>/<file>.parquet)
        spaces = manifest_label_spaces(Path(files[0]).parent.parent) if files else ()
        spec = TransformSpec.from_config(transform, spaces)
    for file in files:
        for record_batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=SHARD_COLUMNS):
            arrays = preprocess_table(pa.Table.from_batches([record_batch]), spec, train)
            yield {name: torch.from_numpy(value) for name, value in arrays.items()}


def first_batches(
    shards_dir: str | Path, split: str, spec: TransformSpec, batches: int, batch_size: int
) -> list[np.ndarray]:
    """The first ``batches`` uint8 image batches of ``split`` through the evaluation transform, in shard order."""
    files = shard_files(shards_dir, split)
    found = [batch["image"].numpy() for batch in islice(local_batches(files, spec, False, batch_size), batches)]
    if not found:
        raise ShardsNotFoundError(f"{shards_dir}/{split}: no rows in its shards")
    return found


def stored_images(files: list[str], limit: int | None = None, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """The stored grayscale images of ``files`` (decoded, at the storage size) and each row's ``source``, in shard
    order; with ``limit``, a seeded random sample of about that many rows, read file by file (a full split's image
    bytes need not fit in memory)."""
    from pipelines.data.imaging import decode_stored

    total = sum(pq.ParquetFile(file).metadata.num_rows for file in files)
    keep = 1.0 if limit is None or limit >= total else limit / total
    rng = np.random.default_rng(seed)
    images, sources = [], []
    for file in files:
        table = pq.read_table(file, columns=["image", "source"])
        rows = np.flatnonzero(rng.random(table.num_rows) < keep)
        column, source = table.column("image"), table.column("source").to_numpy()
        images += [decode_stored(column[int(row)].as_py()) for row in rows]
        sources.append(source[rows])
    return images, np.concatenate(sources) if sources else np.zeros(0, np.int64)
