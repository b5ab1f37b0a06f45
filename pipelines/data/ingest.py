"""`cxr ingest`: raw dataset folders -> Ray Data (decode, validate, resize, hash) -> parquet shards per split.

Every input file ends up either as one row in ``<out>/<split>/*.parquet`` or as one line in
``<out>/rejects.csv`` with its reason. The shards are written to ``<out>.partial`` and renamed into place at
the end, so an interrupted run never leaves a half-written output and a re-run never appends twice.

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
import ray
from ray.data.expressions import col

from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.data.imaging import (
    ImageDecodeError,
    correlation,
    decode_gray,
    encode_png,
    perceptual_hash,
    resize_square,
    thumbnail,
)
from pipelines.data.layouts import Listing, list_covid, list_nih, write_rejects
from pipelines.data.manifest import build_manifest, summary_table
from pipelines.data.splits import SPLITS, covid_splits, find_twins, nih_splits, place_twins
from pipelines.runtime import ensure_ray

log = logging.getLogger(__name__)

# Columns that exist only while ingesting; the shards keep the rest.
MIN_SHARD_FILES = 2  # enough files for two read tasks; bigger files mean fewer per-task overheads (RESULTS.md)
_WORK_COLUMNS = ["path", "official_split", "error_reason", "error_detail", "thumb"]


def decode_batch(batch: pa.Table, storage_size: int) -> pa.Table:
    """Read, decode, grayscale, resize, PNG-encode and hash each file of a batch; failures become error columns."""
    images, hashes, thumbs, modes, widths, heights, reasons, details = [], [], [], [], [], [], [], []
    for path in batch.column("path").to_pylist():
        image = phash = thumb = mode = width = height = reason = detail = None
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            pixels, mode = decode_gray(data)
            height, width = pixels.shape
            small = resize_square(pixels, storage_size)
            image, phash, thumb = encode_png(small), perceptual_hash(small), thumbnail(small).tobytes()
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


def add_split(batch: pa.Table, split_by_key: dict[str, str]) -> pa.Table:
    keys = zip(batch.column("source").to_pylist(), batch.column("relpath").to_pylist(), strict=True)
    return batch.append_column("split", pa.array([split_by_key.get(f"{s}/{r}") for s, r in keys], pa.string()))


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already holds shards; pass --overwrite to replace them")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _decode_all(rows: list[dict[str, Any]], cfg: Config) -> ray.data.Dataset:
    order = np.random.default_rng(cfg.data.split_seed).permutation(len(rows))  # mix sources and classes in shards
    items = [rows[i] for i in order]
    blocks = max(4, len(items) // (cfg.data.decode_batch_size * 4))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"storage_size": cfg.data.storage_size},
        batch_size=cfg.data.decode_batch_size,
        batch_format="pyarrow",
    )
    return ds.materialize()


def _thumb_correlation(a: dict[str, Any], b: dict[str, Any]) -> float:
    return correlation(np.frombuffer(a["thumb"], np.uint8), np.frombuffer(b["thumb"], np.uint8))


def _assign_splits(
    decoded: list[dict[str, Any]], nih: Listing, covid: Listing, cfg: Config
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Split decoded rows, then pull each COVID image that twins an NIH image into the NIH image's split."""
    ok = [r for r in decoded if r["error_reason"] is None]
    nih_rows = [r for r in ok if r["source"] == "nih"]
    covid_rows = [r for r in ok if r["source"] == "covid"]
    nih_split = nih_splits(nih_rows, cfg.data.val_fraction, cfg.data.split_seed)
    covid_split = covid_splits(
        covid_rows, cfg.data.covid_val_fraction, cfg.data.covid_test_fraction, cfg.data.split_seed
    )
    candidates = find_twins(
        [r["phash"] for r in nih_rows], [r["phash"] for r in covid_rows], cfg.data.dedup_max_distance
    )
    twins = [
        (i, j, d)
        for i, j, d in candidates
        if _thumb_correlation(nih_rows[i], covid_rows[j]) >= cfg.data.dedup_min_correlation
    ]
    pairs = [(nih_rows[i]["relpath"], covid_rows[j]["relpath"]) for i, j, _ in twins]
    moved = place_twins(nih_split, covid_split, pairs)
    twin_records = [
        {
            "nih": nih_rows[i]["relpath"],
            "covid": covid_rows[j]["relpath"],
            "distance": d,
            "split": nih_split[nih_rows[i]["relpath"]],
        }
        for i, j, d in twins
    ]
    log.info(
        "%d twin candidates by hash, %d confirmed; moved %d COVID images into their twin's split",
        len(candidates), len(twins), len(moved),
    )  # fmt: skip
    split_by_key = {f"nih/{k}": v for k, v in nih_split.items()} | {f"covid/{k}": v for k, v in covid_split.items()}
    return split_by_key, twin_records


def ingest(
    cfg: Config,
    nih_dir: Path | None = None,
    covid_dir: Path | None = None,
    out: Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the whole ingest; returns the manifest that is also written to ``<out>/manifest.json``."""
    nih_dir, covid_dir = Path(nih_dir or cfg.data.nih_dir), Path(covid_dir or cfg.data.covid_dir)
    out = Path(out or cfg.data.shards_dir)
    started = time.monotonic()
    nih, covid = list_nih(nih_dir), list_covid(covid_dir)
    staging = _prepare_output(out, overwrite)
    ensure_ray(cfg)
    ds = _decode_all(nih.rows + covid.rows, cfg)
    decoded = ds.drop_columns(["image"]).take_all()  # everything but the pixels, for splits and bookkeeping
    rejects = (
        nih.rejects
        + covid.rejects
        + [
            {"source": r["source"], "relpath": r["relpath"], "reason": r["error_reason"], "detail": r["error_detail"]}
            for r in decoded
            if r["error_reason"] is not None
        ]
    )
    split_by_key, twins = _assign_splits(decoded, nih, covid, cfg)
    good = (
        ds.filter(expr=col("error_reason").is_null())
        .map_batches(add_split, fn_kwargs={"split_by_key": split_by_key}, batch_format="pyarrow")
        .drop_columns(_WORK_COLUMNS)
        .materialize()
    )
    for split in SPLITS:
        part = good.filter(expr=col("split") == split)
        if rows := part.count():
            # At most rows_per_shard rows a file, and at least MIN_SHARD_FILES files: streaming reads one file per
            # task, so a small split in one file would be read and decoded by a single core.
            per_file = max(1, min(cfg.data.rows_per_shard, math.ceil(rows / MIN_SHARD_FILES)))
            part.write_parquet(str(staging / split), min_rows_per_file=per_file, max_rows_per_file=per_file)
    rows = [r | {"split": split_by_key[f"{r['source']}/{r['relpath']}"]} for r in decoded if r["error_reason"] is None]
    manifest = build_manifest(cfg, rows, rejects, twins, nih, covid, inputs={"nih": nih_dir, "covid": covid_dir})
    manifest["seconds"] = round(time.monotonic() - started, 1)
    write_rejects(staging / "rejects.csv", rejects)
    (staging / "twins.json").write_text(json.dumps(twins, indent=1))
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nih", type=Path, help="NIH ChestX-ray14 root (default: data.nih_dir)")
    parser.add_argument("--covid", type=Path, help="COVID-19 Radiography Database root (default: data.covid_dir)")
    parser.add_argument("--out", type=Path, help="output folder for shards (default: data.shards_dir)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace, cfg: Config) -> int:
    manifest = ingest(cfg, args.nih, args.covid, args.out, args.overwrite)
    print(summary_table(manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr ingest`; also `python -m pipelines.data.ingest` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
