"""`cxr bench scale`: the data path at growing sizes, up to the real datasets (133,285 images), in one table.

For each size (a fraction of the ``scale`` profile's synthetic set, with its patients, archives and class counts
scaled alike): ``cxr synth`` (skipped when the folder is already there), ``cxr ingest`` and one streamed epoch of
the train split at ``model.input_size`` with training augmentation (``split_datasets`` + ``iter_training_batches``,
consumed by a loop that does no model work; with ``--model NAME`` once more with a forward and backward pass of that
timm model; with ``--checkpoint DIR`` at full size the test split's predictions in one process and as Ray Data batch
inference). Each phase reports its seconds, images/s, the driver's peak RSS, the object store's peak use and the
bytes Ray spilled (sampled every 0.2 s). Ingest also reports its phases (listing, decode, split, twin search,
write), the twin candidates, and the linear limit: the single-process decode + resize + encode cost per image of the
same files, measured in the same run, times the image count, divided by the cores. ``--real-images DIR`` measures
that cost on real radiographs (the 1024 px NIH PNGs) and projects the ingest of the full download.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import ray

from pipelines.cli import run_module
from pipelines.config import Config, config_from_dict
from pipelines.data.imaging import decode_gray, encode_stored, perceptual_hash, resize_square, thumbnail
from pipelines.data.ingest import ingest
from pipelines.data.streaming import iter_training_batches, split_datasets
from pipelines.data.synth import synthesize
from pipelines.runtime import ensure_ray

REAL_COUNTS = {"nih": 112_120, "covid": 21_165}


class ResourcePeaks:
    """Samples the driver's RSS (every ``every_s``) and the object store (used, spilled; every ``store_every_s``,
    since asking the raylet costs CPU that the measured work would otherwise get) in a thread; peaks since start."""

    def __init__(self, every_s: float = 0.2, store_every_s: float = 2.0) -> None:
        self.every_s, self.store_every = every_s, max(1, round(store_every_s / every_s))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._raylet = None
        self.rss = self.store = self.spilled = self._spilled_at_start = 0

    def __enter__(self) -> ResourcePeaks:
        self._spilled_at_start = self._store_stats()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample(store=True)

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self.every_s):
            tick += 1
            self._sample(store=tick % self.store_every == 0)

    def _sample(self, store: bool) -> None:
        self.rss = max(self.rss, psutil.Process().memory_info().rss)
        if store:
            used, spilled = self._store_stats()
            self.store, self.spilled = max(self.store, used), max(self.spilled, spilled - self._spilled_at_start)

    def _store_stats(self) -> tuple[int, int]:
        """(bytes in the object store, bytes spilled since Ray started), from the raylet (a private Ray API; the
        raylet's address is looked up once)."""
        if not ray.is_initialized():
            return 0, 0
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        if self._raylet is None:
            state = get_state_from_address(ray.get_runtime_context().gcs_address)
            node = next(n for n in state.node_table() if n["Alive"])
            self._raylet = (state, node["NodeManagerAddress"], node["NodeManagerPort"])
        state, address, port = self._raylet
        stats = get_memory_info_reply(state, address, port).store_stats
        return int(stats.object_store_bytes_used), int(stats.spilled_bytes_total)


def sized_config(cfg: Config, images: int | None, root: Path) -> Config:
    """``cfg`` (the scale profile) shrunk to about ``images`` images, its data under ``root`` (None: full size)."""
    tree = cfg.model_dump(mode="json")
    synth = tree["data"]["synth"]
    if images is not None:
        full = (synth["nih_images"] or 0) + sum((synth["covid_class_counts"] or {}).values())
        share = images / full
        synth["nih_patients"] = max(2, round(synth["nih_patients"] * share))
        synth["nih_images"] = max(synth["nih_patients"], round(synth["nih_images"] * share))
        synth["covid_class_counts"] = {k: max(1, round(v * share)) for k, v in synth["covid_class_counts"].items()}
        if synth["pneumonia_class_counts"]:  # train and test keep every class, val may lose its few
            synth["pneumonia_class_counts"] = {
                split: {cls: max(split != "val", round(n * share)) for cls, n in counts.items()}
                for split, counts in synth["pneumonia_class_counts"].items()
            }
        elif synth["pneumonia_images"]:
            synth["pneumonia_images"] = max(8, round(synth["pneumonia_images"] * share))
        tree["data"]["pneumonia_dir"] = str(root / f"n{images}" / "pneumonia")
        for key, sub in (("nih_dir", "nih"), ("covid_dir", "covid"), ("shards_dir", "shards")):
            tree["data"][key] = str(root / f"n{images}" / sub)
    return config_from_dict(tree, f"scale at {images or 'full size'}")


def single_process_cost(files: list[Path], storage_size: int, storage_format: str = "png") -> float:
    """Seconds per image for what an ingest task does to one file: read, decode, resize, encode, hash."""
    started = time.perf_counter()
    for path in files:
        small = resize_square(decode_gray(path.read_bytes())[0], storage_size)
        encode_stored(small, storage_format), perceptual_hash(small), thumbnail(small)
    return (time.perf_counter() - started) / max(1, len(files))


def sample_files(folder: Path, count: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    step = max(1, len(files) // count)
    return files[::step][:count]


def run_size(cfg: Config, images: int | None, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    sized = sized_config(cfg, images, root)
    data = sized.data
    rows = []
    if not (Path(data.nih_dir) / "Data_Entry_2017_v2020.csv").is_file():
        with ResourcePeaks() as peaks:
            started = time.perf_counter()
            made = synthesize(sized, data.nih_dir, data.covid_dir, overwrite=True)
            count = sum((made.get(source) or {}).get("images", 0) for source in ("nih", "covid", "pneumonia"))
            rows.append(_row("synth", count, time.perf_counter() - started, peaks))
    cores = int(ray.cluster_resources().get("CPU", 1))
    with ResourcePeaks() as peaks:
        manifest = ingest(sized, overwrite=True)
    total = manifest["input_files"]
    # 1,000 files in about the real shares (NIH 81%, COVID 15%, pneumonia 4% of 139,141)
    sample = sample_files(Path(data.nih_dir), 810) + sample_files(Path(data.covid_dir), 150)
    if data.pneumonia_root.is_dir():
        sample += sample_files(data.pneumonia_root, 40)
    limit = single_process_cost(sample, data.storage_size, data.storage_format) * total / cores
    shard_bytes = sum(p.stat().st_size for p in Path(data.shards_dir).rglob("*.parquet"))
    rows.append(_row("ingest", total, manifest["seconds"], peaks, manifest=manifest, limit=limit, out=shard_bytes))
    rows.append(stream_epoch(sized, None))
    if args.model and total <= args.model_max_images:
        rows.append(stream_epoch(sized, args.model))
    if args.checkpoint and images is None:
        rows += time_evaluation(sized, args.checkpoint)
    if args.drop_data and images is not None:
        shutil.rmtree(root / f"n{images}")
    return rows


def time_evaluation(cfg: Config, checkpoint: Path) -> list[dict[str, Any]]:
    """The test split's predictions by a checkpoint: in this process, then as Ray Data batch inference."""
    from models.checkpoint import model_from_checkpoint
    from pipelines.data.shards import shard_files
    from pipelines.evaluate.inference import predict_local, predict_ray

    files = shard_files(cfg.data.shards_dir, "test")
    rows = []
    for name, predict in (
        ("eval-local", lambda: predict_local(model_from_checkpoint(checkpoint), cfg, files)),
        ("eval-ray", lambda: predict_ray(cfg, checkpoint, files)),
    ):
        with ResourcePeaks() as peaks:
            started = time.perf_counter()
            images = len(predict()["source"])
            rows.append(_row(name, images, time.perf_counter() - started, peaks))
    return rows


def stream_epoch(cfg: Config, model: str | None) -> dict[str, Any]:
    """One pass of the train split as a training worker reads it: decode, augment, torch batches (and, with
    ``model``, the training step ``cxr train`` runs, ``train_epoch``, with that timm model on each batch)."""
    seen = {"images": 0, "first": None}

    def counted(batches):
        for batch in batches:
            seen["first"] = seen["first"] if seen["first"] is not None else time.perf_counter() - started
            seen["images"] += int(batch["image"].shape[0])
            yield batch

    with ResourcePeaks() as peaks:
        started = time.perf_counter()
        batches = counted(iter_training_batches(split_datasets(cfg)["train"], cfg.train.batch_size))
        if model:
            _train_one_epoch(model, cfg.model.input_size, batches, cfg.data.shards_dir)
        else:
            for _ in batches:
                pass
        seconds = time.perf_counter() - started
    return _row("epoch+model" if model else "epoch", seen["images"], seconds, peaks, first_batch=seen["first"])


def _train_one_epoch(name: str, input_size: int, batches, shards_dir: str | Path) -> None:
    import torch

    from models.factory import build_model
    from pipelines.data.shards import manifest_label_spaces
    from pipelines.train.steps import train_epoch, warmup_cosine

    # the heads of the datasets these shards hold, as `cxr train` builds them
    model = build_model(name, input_size, manifest_label_spaces(shards_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = warmup_cosine(optimizer, 0, 1000)
    train_epoch(model, batches, optimizer, scheduler, torch.device("cpu"))


def _row(phase: str, images: int, seconds: float, peaks: ResourcePeaks, **extra: Any) -> dict[str, Any]:
    return {
        "phase": phase, "images": images, "seconds": seconds, "rate": images / seconds if seconds else math.nan,
        "rss": peaks.rss, "store": peaks.store, "spilled": peaks.spilled, **extra,
    }  # fmt: skip


def report(rows: list[dict[str, Any]], cores: int, real: dict[str, float] | None) -> str:
    mib = 1024 * 1024
    lines = [
        f"{'phase':<12}{'images':>9}{'seconds':>9}{'img/s':>8}{'ms/img':>8}{'driver RSS':>12}{'obj store':>11}"
        f"{'spilled':>9}{'vs limit':>10}  ingest phases (s), twins",
    ]
    for r in rows:
        vs = f"{r['seconds'] / r['limit']:.2f}x" if r.get("limit") else ""
        first = f"first batch {r['first_batch']:.1f} s" if r.get("first_batch") is not None else ""
        detail = first
        if "manifest" in r:
            m = r["manifest"]
            phases = " ".join(f"{k} {v:.1f}" for k, v in m["phase_seconds"].items())
            detail = f"{phases}; {m['twin_candidates']} candidates, {m['twins']} twins; out {r['out'] / 2**30:.2f} GiB"
        lines.append(
            f"{r['phase']:<12}{r['images']:>9}{r['seconds']:>9.1f}{r['rate']:>8.0f}{1000 / r['rate']:>8.2f}"
            f"{r['rss'] / mib:>9.0f} MiB{r['store'] / mib:>7.0f} MiB{r['spilled'] / mib:>5.0f} MiB{vs:>10}  {detail}"
        )
    if real:
        ms = 1000 * real["seconds_per_image"]
        hours = {n: REAL_COUNTS["nih"] * real["seconds_per_image"] / n / 3600 for n in (cores, 16)}
        lines += [
            "",
            f"real NIH PNGs ({real['files']} of {real['folder']}, 1024 px): {ms:.1f} ms per image on one core; "
            f"ingest of the 112,120 NIH images projected at {hours[cores]:.2f} h on {cores} cores and "
            f"{hours[16]:.2f} h on a 16-core node (decode-bound; linear in cores)",
        ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="2000,20000,full", help="image counts, `full` for the whole set")
    parser.add_argument("--root", type=Path, default=Path("runs/scale/sizes"), help="where smaller sets are written")
    parser.add_argument("--model", help="also an epoch that trains this timm model (e.g. test_efficientnet)")
    parser.add_argument("--model-max-images", type=int, default=25000, help="sizes above this skip the model epoch")
    parser.add_argument("--checkpoint", type=Path, help="at full size, time evaluation's two paths with this model")
    parser.add_argument("--real-images", type=Path, help="real radiographs whose decode cost is projected")
    parser.add_argument("--drop-data", action="store_true", help="delete each smaller set after it is measured")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if cfg.data.synth.nih_images is None or cfg.data.synth.covid_class_counts is None:
        print("cxr bench scale: use --profile scale (exact image counts)", file=sys.stderr)
        return 2
    ensure_ray(cfg)
    cores = int(ray.cluster_resources().get("CPU", 1))
    load_before = os.getloadavg()[0]
    rows = []
    for size in args.sizes.split(","):
        rows += run_size(cfg, None if size == "full" else int(size), args.root, args)
    real = None
    if args.real_images:
        files = sample_files(args.real_images, 200)
        real = {
            "files": len(files),
            "folder": str(args.real_images),
            "seconds_per_image": single_process_cost(files, 256),
        }
    print(f"`{args.command_line}`: {cores} CPUs, load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(report(rows, cores, real))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr bench scale`; also `python -m pipelines.bench.scale`."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
