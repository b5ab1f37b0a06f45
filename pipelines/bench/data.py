"""`cxr bench data`: images/s into training, single process vs the Ray Data pipeline, on the same shards.

(a) one Python process reads the parquet shards with pyarrow, decodes and augments with the same transform
    function and makes torch tensors: the ceiling of a plain loop on one core.
(b) the Ray Data pipeline training uses (``preprocessed_split`` + ``iter_training_batches``), decoding and
    augmenting in parallel tasks on every core while this process consumes batches, as a train worker does.
(c) optionally (``--naive``), Ray Data with its defaults and a per-batch map, to show what the tuning buys.

All are timed in one run over whole passes after a warm-up pass (a pass reads the split's files repeatedly up
to ``--min-images``), and reported with their ratio to (a) and their mean time to the first batch of a pass.

``--formats png,png_uncompressed,raw`` repeats (a) and (b) with the same rows re-stored in each storage format
(``data.storage_format``; written to a scratch folder) and reports the bytes on disk of each. ``--cache-val`` also
times passes over the validation split decoded every epoch against the same split materialised once
(``train.cache_val``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.data.imaging import decode_stored, encode_stored
from pipelines.data.shards import SHARD_COLUMNS, local_batches, shard_files
from pipelines.data.streaming import iter_training_batches, preprocessed_split
from pipelines.data.transforms import TransformSpec, preprocess_table
from pipelines.runtime import ensure_ray


def naive_ray_pass(cfg: Config, files: list[str], batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    """Ray Data as a first attempt would use it: default reader and block sizes, a per-batch map."""
    ds = ray.data.read_parquet(files).select_columns(SHARD_COLUMNS)
    ds = ds.map_batches(
        preprocess_table,
        fn_kwargs={"spec": TransformSpec.from_config(cfg), "train": True},
        batch_format="pyarrow",
        batch_size=batch_size,
    )
    return ds.iter_torch_batches(batch_size=batch_size)


def time_passes(make_pass: Callable[[], Iterable[dict[str, torch.Tensor]]], passes: int) -> dict[str, float]:
    """Throughput over ``passes`` full passes after one untimed warm-up pass, and the mean time to first batch."""
    for _ in make_pass():
        pass
    images, first_batch, started = 0, 0.0, time.perf_counter()
    for _ in range(passes):
        pass_started = time.perf_counter()
        for index, batch in enumerate(make_pass()):
            if index == 0:
                first_batch += time.perf_counter() - pass_started
            images += int(batch["image"].shape[0])
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "rate": images / seconds, "first_batch": first_batch / passes}


def measure(
    cfg: Config, split: str, batch_size: int, passes: int, min_images: int, naive: bool, shards_dir: Path | None = None
) -> dict[str, dict]:
    shards_dir = shards_dir or Path(cfg.data.shards_dir)
    files = shard_files(shards_dir, split)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    repeat = max(1, -(-min_images // rows))  # long passes, so per-pass start-up does not dominate
    results = {"single process": time_passes(lambda: local_batches(files * repeat, cfg, True, batch_size), passes)}
    ensure_ray(cfg)
    if naive:  # first, while the DataContext still has Ray's defaults (preprocessed_split sets ours)
        results["ray data, defaults"] = time_passes(lambda: naive_ray_pass(cfg, files * repeat, batch_size), passes)
    results["ray data"] = time_passes(
        lambda: iter_training_batches(
            preprocessed_split(cfg, split, shards_dir, batch_size=batch_size, repeat=repeat), batch_size
        ),
        passes,
    )
    for result in results.values():
        result["disk_bytes"] = sum(Path(f).stat().st_size for f in files)
    return results


def restore_shards(files: list[str], storage_format: str, folder: Path) -> None:
    """The same rows with their images re-stored in ``storage_format`` (same pixels), under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        table = pq.read_table(file)
        images = [encode_stored(decode_stored(data), storage_format) for data in table.column("image").to_pylist()]
        table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
        pq.write_table(table, folder / Path(file).name)


def measure_val_cache(cfg: Config, batch_size: int, passes: int) -> dict[str, dict]:
    """Validation passes decoded every time against one materialised copy (``train.cache_val``)."""
    ensure_ray(cfg)
    plain = time_passes(lambda: iter_training_batches(preprocessed_split(cfg, "val"), batch_size), passes)
    started = time.perf_counter()
    cached = preprocessed_split(cfg, "val").materialize()
    build = time.perf_counter() - started
    once = {"images": cached.count(), "seconds": build, "rate": cached.count() / build, "first_batch": build}
    return {
        "val, decoded every pass": plain,
        "val, decoded once (materialise)": once,
        "val, cached passes": time_passes(lambda: iter_training_batches(cached, batch_size), passes),
    }


def report(results: dict[str, dict], cfg: Config, batch_size: int) -> str:
    """One row per pipeline; ``vs (a)``: against the single process of the same storage format."""
    lines = [
        f"shards {cfg.data.shards_dir} (stored {cfg.data.storage_size} px) -> train transform at "
        f"{cfg.model.input_size} px, batch {batch_size}, {ray.cluster_resources().get('CPU', 0):.0f} CPUs",
        f"{'pipeline':<36}{'images':>8}{'seconds':>9}{'images/s':>10}{'vs (a)':>8}{'1st batch':>11}{'disk MB':>9}",
    ]
    for name, r in results.items():
        base_name = name.replace("ray data, defaults", "single process").replace("ray data", "single process")
        base = results.get(base_name) if base_name != name or name.startswith("single process") else None
        ratio = f"{r['rate'] / base['rate']:>7.2f}x" if base else f"{'':>8}"
        disk = f"{r['disk_bytes'] / 1e6:>9.1f}" if "disk_bytes" in r else ""
        lines.append(
            f"{name:<36}{r['images']:>8}{r['seconds']:>9.2f}{r['rate']:>10.0f}{ratio}{r['first_batch']:>10.2f}s{disk}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--passes", type=int, default=2, help="timed passes (after a warm-up pass)")
    parser.add_argument("--min-images", type=int, default=6000, help="read the split's files repeatedly up to this")
    parser.add_argument("--naive", action="store_true", help="also time Ray Data with default settings")
    parser.add_argument("--formats", help="storage formats to compare, e.g. png,png_uncompressed,raw")
    parser.add_argument("--cache-val", action="store_true", help="also time validation passes cached vs decoded")


def run(args: argparse.Namespace, cfg: Config) -> int:
    batch_size = args.batch_size or cfg.train.batch_size
    results = {}
    if args.formats:
        with tempfile.TemporaryDirectory(prefix="cxr-bench-formats-") as scratch:
            for storage_format in args.formats.split(","):
                folder = Path(scratch) / storage_format
                restore_shards(shard_files(cfg.data.shards_dir, args.split), storage_format, folder / args.split)
                found = measure(cfg, args.split, batch_size, args.passes, args.min_images, args.naive, folder)
                results |= {f"{name} [{storage_format}]": r for name, r in found.items()}
    else:
        results = measure(cfg, args.split, batch_size, args.passes, args.min_images, args.naive)
    if args.cache_val:
        results |= measure_val_cache(cfg, batch_size, args.passes)
    print(report(results, cfg, batch_size))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr bench data`; also `python -m pipelines.bench.data` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
