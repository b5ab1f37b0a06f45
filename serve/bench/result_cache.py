"""`python -m serve.bench.result_cache`: what the router's result cache buys when some requests repeat earlier images.

One workload, sent twice by closed-loop clients on 127.0.0.1 to the same app: once deployed with
``serve.cache.enabled=false``, once with the cache on (the LRU, empty after each deploy; or Redis if
``serve.cache.redis_url`` is set, which keeps what earlier runs stored: give it an empty database). Request ``i``
repeats an image already sent with probability ``repeat_fraction`` (picked among the earlier requests, so popular
images come back more often), otherwise it sends the next unseen image. Figures: req/s with the cache off and on,
the hit rate (a repeat whose first request is still in flight misses), p50 and p95 latency, and the p50 of hits and
of misses apart. ``cache_throughput`` is the hook ``cxr bench export`` calls; the app start and the clients are
``serve.bench.serving``'s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.runtime import ensure_ray
from serve.bench.serving import (
    closed_loop,
    deploy,
    files_in,
    full_size_checkpoints,
    http_sender,
    sample_images,
)

WARMUP_IMAGES = 2  # kept out of the workload: the warm-up must not fill the cache with images the workload sends
MAX_REQUESTS = 400


def workload(images: int, repeat_fraction: float, max_requests: int = MAX_REQUESTS, seed: int = 0) -> list[int]:
    """Image indices, one per request: each unseen image once, and repeats of earlier requests in between."""
    if not 0.0 <= repeat_fraction < 1.0:
        raise ValueError(f"repeat_fraction must be in [0, 1), got {repeat_fraction}")
    if images < 1:
        raise ValueError("the workload needs at least one image")
    count = min(max_requests, round(images / (1.0 - repeat_fraction)))
    rng = np.random.default_rng(seed)
    order: list[int] = []
    fresh = 0
    for _ in range(count):
        if order and (fresh >= images or rng.random() < repeat_fraction):
            order.append(order[int(rng.integers(len(order)))])
        else:
            order.append(fresh)
            fresh += 1
    return order


def timing_hits(send: Callable[[int], dict | None], seconds: dict[bool, list[float]]) -> Callable[[int], dict | None]:
    """``send`` that files each answer's latency under ``seconds[hit]`` (``cache.hit`` of the answer)."""
    lock = threading.Lock()

    def wrapped(index: int) -> dict | None:
        began = time.perf_counter()
        answer = send(index)
        elapsed = time.perf_counter() - began
        if answer is not None:
            with lock:
                seconds[bool(answer.get("cache", {}).get("hit"))].append(elapsed)
        return answer

    return wrapped


def one_cell(url: str, warm: list[bytes], sequence: list[bytes], mode: str, clients: int, seconds: float) -> dict:
    closed_loop(http_sender(url, warm, mode, None), clients, 1.0, 20)  # connections, thread pools, first batches
    by_hit: dict[bool, list[float]] = {True: [], False: []}
    row = closed_loop(timing_hits(http_sender(url, sequence, mode, None), by_hit), clients, seconds, len(sequence))
    row["hits"] = len(by_hit[True])
    row["hit_rate"] = row["hits"] / max(1, row["requests"])
    for name, hit in (("p50_hit", True), ("p50_miss", False)):
        row[name] = float(np.percentile(np.array(by_hit[hit]) * 1e3, 50)) if by_hit[hit] else float("nan")
    return row


def cache_throughput(
    cfg: Config,
    images: list[bytes],
    clients: int,
    repeat_fraction: float,
    *,
    mode: str = "adaptive",
    seconds: float = 120.0,
    max_requests: int = MAX_REQUESTS,
    checkpoints: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Deploy the app with the cache off, then on; send the same workload to each. Starts Ray if needed, and
    starts and shuts down Serve itself (on ``serve.port``).

    ``seconds`` bounds each cell; the default leaves room for the whole workload at a few req/s, so both cells
    send the same requests. Returns req/s, hit rate and latencies of both cells, and the speed-up."""
    from ray import serve

    if len(images) <= WARMUP_IMAGES:
        raise ValueError(f"need more than {WARMUP_IMAGES} images (the first {WARMUP_IMAGES} only warm up)")
    warm, pool = images[:WARMUP_IMAGES], images[WARMUP_IMAGES:]
    order = workload(len(pool), repeat_fraction, max_requests)
    sequence = [pool[i] for i in order]
    ensure_ray(cfg)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    cells: dict[str, dict] = {}
    try:
        for name, enabled in (("off", False), ("on", True)):
            url = deploy(cfg, batched=True, checkpoints=checkpoints, cache=enabled)
            cells[name] = one_cell(url, warm, sequence, mode, clients, seconds)
    finally:
        serve.shutdown()
    off, on = cells["off"], cells["on"]
    return {
        "mode": mode,
        "clients": clients,
        "repeat_fraction": repeat_fraction,
        "repeat_share": 1.0 - len(set(order)) / len(order),  # of the requests sent: the most hits can reach
        "requests": len(order),
        "distinct_images": len(set(order)),
        "store": "redis" if cfg.serve.cache.redis_url else "lru",
        "off_rps": off["rate"],
        "on_rps": on["rate"],
        "speedup": on["rate"] / off["rate"] if off["rate"] else float("nan"),
        "hit_rate": on["hit_rate"],
        "p50_off_ms": off["p50"],
        "p50_on_ms": on["p50"],
        "p50_on_hit_ms": on["p50_hit"],
        "p50_on_miss_ms": on["p50_miss"],
        "cells": cells,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"mode {result['mode']}, {result['clients']} clients, {result['requests']} requests over "
        f"{result['distinct_images']} images (repeats: {result['repeat_share']:.0%} of requests), store "
        f"{result['store']}",
        "",
        "| cache | requests | errors | req/s | p50 ms | p95 ms | hit rate | p50 ms of hits | p50 ms of misses |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result["cells"].items():
        lines.append(
            f"| {name} | {row['requests']} | {row['errors']} | {row['rate']:.1f} | {row['p50']:.1f} | "
            f"{row['p95']:.1f} | {row['hit_rate']:.0%} | {row['p50_hit']:.1f} | {row['p50_miss']:.1f} |"
        )
    lines += ["", f"speed-up with the cache: {result['speedup']:.2f}x"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--repeat-fraction", type=float, default=0.5, help="share of requests repeating an image")
    parser.add_argument("--images", type=int, default=130, help="distinct images (the first two only warm up)")
    parser.add_argument("--images-dir", type=Path, help="send these files (e.g. real NIH PNGs) instead of the shards'")
    parser.add_argument("--mode", default="adaptive", choices=("adaptive", "cnn", "vit", "ensemble"))
    parser.add_argument("--seconds", type=float, default=120.0, help="time budget per cell")
    parser.add_argument("--max-requests", type=int, default=MAX_REQUESTS, help="request budget of the workload")
    parser.add_argument("--full-size", action="store_true", help="random-weight production-size models at 224 px")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.images_dir:
        images = files_in(args.images_dir, args.images)
    else:
        images, _ = sample_images(cfg, args.images)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = full_size_checkpoints(Path(scratch)) if args.full_size else None
        result = cache_throughput(
            cfg,
            images,
            args.clients,
            args.repeat_fraction,
            mode=args.mode,
            seconds=args.seconds,
            max_requests=args.max_requests,
            checkpoints=checkpoints,
        )
    print(report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr bench cache`; also `python -m serve.bench.result_cache` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
