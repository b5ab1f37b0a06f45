"""Streaming shards into training: Ray Datasets per split that decode and augment on the cluster's CPUs,
and iterators of torch batches with the source of each sample and every head's labels.

``split_datasets(cfg)`` is what ``TorchTrainer(datasets=...)`` receives; each worker then iterates its own
shard with ``iter_training_batches(ray.train.get_dataset_shard("train"), ...)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import pyarrow as pa
import ray
import torch

from pipelines.config import Config
from pipelines.data.shards import SHARD_COLUMNS, load_manifest, manifest_label_spaces, shard_files
from pipelines.data.splits import SPLITS
from pipelines.data.transforms import TransformSpec, preprocess_table


def configure_data_context() -> None:
    """Settings measured with ``cxr bench data`` (see benchmarks/RESULTS.md)."""
    ctx = ray.data.DataContext.get_current()
    # The file-based V1 parquet reader: in Ray 2.60 the V2 reader lists files in a separate task that costs
    # 1-4 s per pass and reads a small split in a single task, leaving the other cores idle.
    ctx.use_datasource_v2 = False
    # Small blocks leave the map tasks as soon as a batch or two is ready instead of piling up to 128 MiB.
    ctx.target_max_block_size = 8 * 1024 * 1024
    # Training runs a pass per epoch and split; per-operator bars would drown the per-epoch lines, and so would
    # the "Starting execution" / "Execution plan" pair each pass logs (the plan is in the dashboard's Data tab).
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def read_split(
    shards_dir: str | Path, split: str, columns: list[str] | None = None, shuffle_files: bool = False, repeat: int = 1
) -> ray.data.Dataset:
    """The raw rows of one split (encoded images and labels), one read task per shard file.

    ``repeat`` reads every file that many times in one pass (benchmarks use it to time long passes).
    """
    configure_data_context()
    files = shard_files(shards_dir, split) * repeat
    ds = ray.data.read_parquet(files, override_num_blocks=len(files), shuffle="files" if shuffle_files else None)
    return ds.select_columns(columns or SHARD_COLUMNS)


def preprocess_chunks(table: pa.Table, spec: TransformSpec, train: bool, chunk_rows: int) -> Iterator[dict[str, Any]]:
    """Preprocess a whole read block in ``chunk_rows`` pieces, yielding each so it streams on at once."""
    cv2.setNumThreads(1)  # one OpenCV thread per task: Ray Data already runs a task per core
    for start in range(0, table.num_rows, chunk_rows):
        yield preprocess_table(table.slice(start, chunk_rows), spec, train)


def preprocessed_split(
    cfg: Config,
    split: str,
    shards_dir: str | Path | None = None,
    train: bool | None = None,
    batch_size: int | None = None,
    repeat: int = 1,
) -> ray.data.Dataset:
    """Decode + transform one split lazily; training augmentation by default only on ``train``.

    ``batch_size=None`` on ``map_batches`` lets Ray fuse it into the read task (a map with a fixed batch size
    is not fused, and then the read and map operators split the CPUs between them, leaving the map at one core
    on a 2-core machine). The function slices its block itself and yields chunks, so batches still stream.
    """
    train = split == "train" if train is None else train
    # A new file order every pass (rows were shuffled across files at ingest); a local shuffle buffer in
    # ``iter_training_batches`` mixes within files.
    shards_dir = shards_dir or cfg.data.shards_dir
    ds = read_split(shards_dir, split, shuffle_files=train, repeat=repeat)
    chunk_rows = batch_size or cfg.train.batch_size
    spec = TransformSpec.from_config(cfg, manifest_label_spaces(shards_dir))
    return ds.map_batches(
        preprocess_chunks,
        fn_kwargs={"spec": spec, "train": train, "chunk_rows": chunk_rows},
        batch_format="pyarrow",
        batch_size=None,
    )


def split_datasets(cfg: Config, shards_dir: str | Path | None = None) -> dict[str, ray.data.Dataset]:
    """train/val/test datasets ready for ``TorchTrainer(datasets=...)``; splits with no shards are left out."""
    folder = Path(shards_dir or cfg.data.shards_dir)
    load_manifest(folder)
    return {s: preprocessed_split(cfg, s, folder) for s in SPLITS if any((folder / s).glob("*.parquet"))}


def iter_training_batches(
    ds: ray.data.DataIterator | ray.data.Dataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    shuffle_buffer: int | None = None,
    drop_last: bool = False,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, torch.Tensor]]:
    """Torch batches: ``image [B,1,H,W] uint8`` (models normalise on their device), ``source [B]`` (the index of
    the row's head) and per head ``label_<head>`` (``models.labels.label_key``: float ``[B,K]`` 0/1 for a
    multi-label head, int64 ``[B]`` class indices for a multi-class one, filled on other sources' rows); the numpy
    dtypes of ``preprocess_table`` carry over."""
    return ds.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        local_shuffle_buffer_size=shuffle_buffer,
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
    )
