"""Render and write planned images, in chunks over a process pool (or in-process for one worker).

Each image's pixels depend only on its plan record and the seed, so the bytes on disk are the same for
any number of workers and any chunking.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data.synth import layouts
from pipelines.data.synth.plan import CovidImage, NihImage
from pipelines.data.synth.pool import pooled_image
from pipelines.data.synth.render import burn_marker, render_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where and how one source's images are written."""

    seed: int
    root: Path
    size: int
    nih_root: Path | None = None  # COVID near-duplicates copy files from here
    pool: int = 0  # data.synth.render_pool: 0 renders every image, N derives images from N bases per label set
    marker: bool = False  # data.synth.source_marker: burn the source's site tag into the finished pixels

    def finish(self, pixels: np.ndarray, source: str) -> np.ndarray:
        """The pixels as written: with the source's tag when ``marker`` (last, so no later step moves or crops it)."""
        return burn_marker(pixels, source) if self.marker else pixels


def write_nih_image(img: NihImage, target: Target) -> None:
    path = target.root / img.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    if target.pool:
        pixels = pooled_image(target.seed, "nih", img.index, img.findings, target.size, target.pool)
    else:
        pixels = render_image(target.seed, "nih", img.patient, img.index, img.findings, target.size, img.followup)
    data = layouts.encode_png(target.finish(pixels, "nih"), img.mode)
    if img.plant in layouts.DECODE_PLANTS:
        data = layouts.corrupt_bytes(img.plant, data)
    path.write_bytes(data)


def write_covid_image(img: CovidImage, target: Target) -> None:
    path = target.root / img.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.duplicate_of is not None:  # a copy of an NIH file, its tag included when marked, as a re-shared film
        assert target.nih_root is not None, "near-duplicates need the NIH images written first"
        data = layouts.near_duplicate_png(target.nih_root / img.duplicate_of, target.size, img.brightness, img.mode)
    else:
        if target.pool:
            pixels = pooled_image(target.seed, "covid", img.index, (img.cls,), target.size, target.pool)
        else:
            pixels = render_image(target.seed, "covid", img.index, img.index, (img.cls,), target.size)
        data = layouts.encode_png(target.finish(pixels, "covid"), img.mode)
    if img.plant in layouts.DECODE_PLANTS:
        data = layouts.corrupt_bytes(img.plant, data)
    path.write_bytes(data)


def _write_chunk(writer: Callable[[object, Target], None], records: Sequence[object], target: Target) -> int:
    for record in records:
        writer(record, target)
    return len(records)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _chunks(records: Sequence[object], workers: int) -> list[Sequence[object]]:
    size = max(4, min(64, len(records) // (workers * 4) or 1))
    return [records[i : i + size] for i in range(0, len(records), size)]


class Runner:
    """Writes batches of records with ``workers`` processes (spawned, so it is safe beside threads)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Runner:
        if self.workers > 1:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, writer: Callable[[object, Target], None], records: Sequence[object], target: Target) -> int:
        """Write every record; returns how many were written (any worker error is raised here)."""
        if self._pool is None or len(records) < 16:
            return _write_chunk(writer, records, target)
        futures = [self._pool.submit(_write_chunk, writer, chunk, target) for chunk in _chunks(records, self.workers)]
        return sum(future.result() for future in futures)
