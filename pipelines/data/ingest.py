"""`cxr ingest`: raw dataset folders -> Ray tasks (decode, validate, resize, hash) -> parquet shards per split.

Every input file ends up either as one row in ``<out>/<split>/*.parquet`` or as one line in
``<out>/rejects.csv`` with its reason. The shards are written to ``<out>.partial`` and renamed into place at
the end, so an interrupted run never leaves a half-written output and a re-run never appends twice.

Pixels stream and are never held whole: pass 1 (Ray tasks, a chunk of files each) decodes every file and writes
the stored image with its hash and thumbnail straight to ``<out>.partial/_decoded/``; only the small columns
(labels, patient, hash, thumbnail, errors) come back to the driver, which splits patients and places twins;
pass 2 copies each decoded file's rows into its split's shards (no decoding), one file at a time.

Run it as ``cxr ingest`` or ``python -m pipelines.data.ingest`` (e.g. under ``ray job submit``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.data.datasets import DATASETS, Dataset, DatasetLayoutError, Listing
from pipelines.data.datasets.base import write_rejects
from pipelines.data.imaging import (
    ImageDecodeError,
    decode_gray,
    encode_stored,
    perceptual_hash,
    resize_square,
    thumbnail,
)
from pipelines.data.manifest import build_manifest, summary_table
from pipelines.data.splits import SPLITS, confirm_twins, find_twins, place_twins
from pipelines.runtime import ensure_ray

log = logging.getLogger(__name__)

MIN_SHARD_FILES = 2  # enough files for two read tasks; bigger files mean fewer per-task overheads (RESULTS.md)
DECODED_DIR = "_decoded"  # pass 1's output inside the staging folder, removed before the rename
# Columns that exist only while ingesting; the shards keep the rest.
_WORK_COLUMNS = ["path", "official_split", "error_reason", "error_detail", "thumb"]


def decode_batch(batch: pa.Table, storage_size: int, storage_format: str = "png") -> pa.Table:
    """Read, decode, grayscale, resize, encode (``data.storage_format``) and hash each file of a batch; failures
    become error columns."""
    images, hashes, thumbs, modes, widths, heights, reasons, details = [], [], [], [], [], [], [], []
    for path in batch.column("path").to_pylist():
        image = phash = thumb = mode = width = height = reason = detail = None
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            pixels, mode = decode_gray(data)
            height, width = pixels.shape
            small = resize_square(pixels, storage_size)
            image, phash, thumb = (
                encode_stored(small, storage_format),
                perceptual_hash(small),
                thumbnail(small).tobytes(),
            )
        except ImageDecodeError as err:
            reason, detail = err.reason, err.detail
        except OSError as err:
            reason, detail = "unreadable", str(err)
        for column, value in zip(
            (images, hashes, thumbs, modes, widths, heights, reasons, details),
            (image, phash, thumb, mode, width, height, reason, detail),
            strict=True,
        ):
            column.append(value)
    new_columns = {
        "image": pa.array(images, pa.binary()),
        "phash": pa.array(hashes, pa.int64()),
        "thumb": pa.array(thumbs, pa.binary()),
        "decoded_mode": pa.array(modes, pa.string()),
        "decoded_width": pa.array(widths, pa.int32()),
        "decoded_height": pa.array(heights, pa.int32()),
        "error_reason": pa.array(reasons, pa.string()),
        "error_detail": pa.array(details, pa.string()),
    }
    for name, array in new_columns.items():
        batch = batch.append_column(name, array)
    return batch


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already holds shards; pass --overwrite to replace them")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


@ray.remote(num_cpus=1)
def _decode_task(items: list[dict[str, Any]], schema: pa.Schema, path: str, size: int, fmt: str) -> pa.Table:
    """Decode one chunk of files, write it whole to ``path`` and return it without the pixels."""
    table = decode_batch(pa.Table.from_pylist(items, schema=schema), size, fmt)
    pq.write_table(table, path)
    return table.drop_columns(["image"])


def _decode_to_files(rows: list[dict[str, Any]], cfg: Config, folder: Path) -> tuple[list[Path], pa.Table]:
    """Pass 1: decode every file on the cluster, each task writing its chunk to ``folder``; returns the files and
    every column but the pixels.

    Plain Ray tasks, not a Ray Data pipeline: on 2 cores they decoded at 1.98 ms an image against Ray Data's
    2.74-3.24 ms (RESULTS.md). The pixels go from the task to its file and never through the object store.
    """
    order = np.random.default_rng(cfg.data.split_seed).permutation(len(rows))  # mix sources and classes in files
    items = [rows[i] for i in order]
    schema = pa.Table.from_pylist(items).schema  # one schema for every chunk, whatever sources it holds
    # At least 4 tasks a CPU, so that no core idles at the end while one long task finishes.
    per_task = max(1, min(cfg.data.decode_files_per_task, math.ceil(len(items) / (4 * _cluster_cpus()))))
    folder.mkdir(parents=True)
    pending = {
        _decode_task.remote(
            items[start : start + per_task],
            schema,
            str(folder / f"part-{start // per_task:05d}.parquet"),
            cfg.data.storage_size,
            cfg.data.storage_format,
        ): start
        for start in range(0, len(items), per_task)
    }
    small: dict[int, pa.Table] = {}
    report_every = max(1, len(pending) // 10)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        small[pending.pop(done[0])] = ray.get(done[0])
        if len(small) % report_every == 0:
            log.info("decoded %d of %d files", sum(t.num_rows for t in small.values()), len(items))
    return sorted(folder.glob("*.parquet")), pa.concat_tables([small[start] for start in sorted(small)])


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class _ShardWriter:
    """One split's parquet files, ``per_file`` rows each (the last may hold fewer)."""

    def __init__(self, folder: Path, per_file: int) -> None:
        self.folder, self.per_file = folder, per_file
        self.folder.mkdir(parents=True)
        self.files = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                path = self.folder / f"shard-{self.files:05d}.parquet"
                self._writer, self._rows, self.files = pq.ParquetWriter(path, table.schema), 0, self.files + 1
            take = min(table.num_rows, self.per_file - self._rows)
            self._writer.write_table(table.slice(0, take))
            table, self._rows = table.slice(take), self._rows + take
            if self._rows == self.per_file:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _write_splits(files: list[Path], staging: Path, split_by_key: dict[str, str], cfg: Config) -> None:
    """Pass 2: each decoded file's good rows go, with their split, to that split's shards (no decoding)."""
    counts = {split: sum(1 for v in split_by_key.values() if v == split) for split in SPLITS}
    # At most rows_per_shard rows a file, and at least MIN_SHARD_FILES files: streaming reads one file per task,
    # so a small split in one file would be read and decoded by a single core.
    writers = {
        split: _ShardWriter(staging / split, max(1, min(cfg.data.rows_per_shard, math.ceil(n / MIN_SHARD_FILES))))
        for split, n in counts.items()
        if n
    }
    for file in files:
        table = pq.read_table(file)
        table = table.filter(pc.is_null(table.column("error_reason")))
        keys = zip(table.column("source").to_pylist(), table.column("relpath").to_pylist(), strict=True)
        splits = pa.array([split_by_key[f"{s}/{r}"] for s, r in keys], pa.string())
        table = table.append_column("split", splits).drop_columns(_WORK_COLUMNS)
        for split, writer in writers.items():
            writer.write(table.filter(pc.equal(table.column("split"), split)))
    for writer in writers.values():
        writer.close()


def _thumbs(rows: list[dict[str, Any]]) -> np.ndarray:
    """The rows' thumbnails as one uint8 array, a flattened thumbnail per row."""
    return np.frombuffer(b"".join(r["thumb"] for r in rows), np.uint8).reshape(len(rows), -1)


class _PhaseClock:
    """Wall seconds per ingest phase, for the manifest and the scale benchmark."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self._last, 3)
        self._last = now

    def total(self) -> float:
        return time.monotonic() - self.started


def _twins_between(
    kept: list[dict[str, Any]], moved: list[dict[str, Any]], cfg: Config
) -> tuple[list[tuple[int, int, int]], int]:
    """Confirmed twins (kept index, moved index, distance) between two datasets' rows, and the hash candidates."""
    candidates = find_twins([r["phash"] for r in kept], [r["phash"] for r in moved], cfg.data.dedup_max_distance)
    return confirm_twins(candidates, _thumbs(kept), _thumbs(moved), cfg.data.dedup_min_correlation), len(candidates)


def _assign_splits(
    decoded: list[dict[str, Any]], datasets: list[Dataset], cfg: Config, clock: _PhaseClock
) -> tuple[dict[str, str], list[dict[str, Any]], int]:
    """Split each dataset's decoded rows by its own rule, then, for every pair of datasets, pull each image of the
    later one that twins an image of the earlier one into that image's split. Keys are ``<source>/<relpath>``."""
    ok = [r for r in decoded if r["error_reason"] is None]
    rows = {d.source: [r for r in ok if r["source"] == d.source] for d in datasets}
    split_of = {d.source: d.assign_splits(rows[d.source], cfg.data) for d in datasets}
    clock.lap("split")
    records, candidates, moved = [], 0, 0
    for i, first in enumerate(datasets):
        for second in datasets[i + 1 :]:
            kept, later = rows[first.source], rows[second.source]
            twins, found = _twins_between(kept, later, cfg)
            candidates += found
            pairs = [(kept[k]["relpath"], later[m]["relpath"]) for k, m, _ in twins]
            moved += len(place_twins(split_of[first.source], split_of[second.source], pairs))
            records += [
                {
                    "kept_source": first.source,
                    "kept": kept[k]["relpath"],
                    "moved_source": second.source,
                    "moved": later[m]["relpath"],
                    "distance": d,
                    "split": split_of[first.source][kept[k]["relpath"]],
                }
                for k, m, d in twins
            ]
    clock.lap("twins")
    log.info(
        "%d twin candidates by hash, %d confirmed; moved %d images into their twin's split",
        candidates, len(records), moved,
    )  # fmt: skip
    split_by_key = {
        f"{source}/{relpath}": split for source, splits in split_of.items() for relpath, split in splits.items()
    }
    return split_by_key, records, candidates


def _list_datasets(cfg: Config, roots: dict[str, Path | None]) -> list[Listing]:
    """Every registered dataset's listing. A root given on the command line must exist; a dataset's configured
    root must too, unless the dataset is optional, in which case a missing folder skips it (with a log line)."""
    listings = []
    for source, dataset in DATASETS.items():
        given = roots.get(source)
        root = Path(given or dataset.root(cfg.data))
        if given is None and not dataset.required and not root.exists():
            log.info("%s: no folder at %s (data.%s_dir); ingesting without it", dataset.title, root, source)
            continue
        listings.append(dataset.list_files(root))
    if not listings:
        raise DatasetLayoutError("no dataset to ingest")
    return listings


def ingest(
    cfg: Config,
    roots: dict[str, Path | None] | None = None,
    out: Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the whole ingest; returns the manifest that is also written to ``<out>/manifest.json``.

    ``roots`` maps a dataset's source name to its folder, overriding the config (``--nih``, ``--covid``, ...)."""
    out = Path(out or cfg.data.shards_dir)
    clock = _PhaseClock()
    listings = _list_datasets(cfg, roots or {})
    datasets = [DATASETS[listing.source] for listing in listings]
    staging = _prepare_output(out, overwrite)
    clock.lap("listing")
    ensure_ray(cfg)
    decoded_files, small_columns = _decode_to_files([r for x in listings for r in x.rows], cfg, staging / DECODED_DIR)
    clock.lap("decode")
    decoded = small_columns.to_pylist()
    del small_columns  # the rows hold the same values; keep one copy
    rejects = [r for listing in listings for r in listing.rejects] + [
        {"source": r["source"], "relpath": r["relpath"], "reason": r["error_reason"], "detail": r["error_detail"]}
        for r in decoded
        if r["error_reason"] is not None
    ]
    split_by_key, twins, candidates = _assign_splits(decoded, datasets, cfg, clock)
    _write_splits(decoded_files, staging, split_by_key, cfg)
    shutil.rmtree(staging / DECODED_DIR)
    clock.lap("write")
    rows = [r | {"split": split_by_key[f"{r['source']}/{r['relpath']}"]} for r in decoded if r["error_reason"] is None]
    manifest = build_manifest(cfg, rows, rejects, twins, listings)
    manifest["seconds"] = round(clock.total(), 1)
    manifest["phase_seconds"] = clock.phases
    manifest["twin_candidates"] = candidates
    write_rejects(staging / "rejects.csv", rejects)
    (staging / "twins.json").write_text(json.dumps(twins, indent=1))
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for source, dataset in DATASETS.items():
        parser.add_argument(
            dataset.cli_flag or f"--{source}", dest=f"root_{source}", type=Path, metavar="DIR",
            help=f"{dataset.title} root (default: data.{source}_dir)",
        )  # fmt: skip
    parser.add_argument("--out", type=Path, help="output folder for shards (default: data.shards_dir)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace, cfg: Config) -> int:
    roots = {source: getattr(args, f"root_{source}") for source in DATASETS}
    manifest = ingest(cfg, roots, args.out, args.overwrite)
    print(summary_table(manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr ingest`; also `python -m pipelines.data.ingest` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
