"""`cxr bench serve`: throughput and latency of the Serve app against the models called in-process, in one run.

Closed-loop clients on 127.0.0.1 (each sends its next request when the last one is answered), bounded by
``--seconds`` per cell and ``--max-requests``. Cells:
  direct        the same decode + preprocess + forward in this process, one image at a time (the limit)
  serve cnn     ?mode=cnn, 1 and ``--clients`` clients
  serve ensemble ?mode=ensemble (both models every time)
  serve adaptive the gate at the tuned threshold (ensemble.yaml) or the config's
  unbatched     adaptive with ``batch_max_size=1`` on both models (the app is redeployed for it)
Images: the demo's synthetic test split (PNG bytes from the shards). The table goes to stdout and, with
``--write``, into the "Serving" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import requests

from pipelines.cli_args import add_config_args, config_from_args
from pipelines.config import Config
from pipelines.ensemble_settings import load_settings
from pipelines.ray_runtime import ensure_ray
from pipelines.streaming import shard_files

RESULTS = Path("benchmarks/RESULTS.md")


def sample_images(cfg: Config, limit: int) -> list[bytes]:
    images: list[bytes] = []
    for file in shard_files(cfg.data.shards_dir, "test"):
        images += pq.read_table(file, columns=["image"]).column("image").to_pylist()
        if len(images) >= limit:
            break
    return images[:limit]


def closed_loop(send: Callable[[int], dict | None], clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` threads calling ``send(i)`` back to back until the time or request budget is spent."""
    latencies: list[float] = []
    escalated, errors, counter, lock = 0, 0, [0], threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        nonlocal escalated, errors
        while time.perf_counter() < deadline:
            with lock:
                if counter[0] >= max_requests:
                    return
                index = counter[0]
                counter[0] += 1
            began = time.perf_counter()
            answer = send(index)
            elapsed = time.perf_counter() - began
            with lock:
                if answer is None:
                    errors += 1
                else:
                    latencies.append(elapsed)
                    escalated += int(bool(answer.get("gate", {}).get("escalated")))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "rate": len(latencies) / wall,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "vit_fraction": escalated / max(1, len(latencies)),
    }


def direct_sender(cfg: Config, images: list[bytes], mode: str) -> Callable[[int], dict | None]:
    """The serving path without Serve: decode, preprocess and forward in this process, one thread."""
    import torch

    from models.checkpoint import load_checkpoint, model_from_checkpoint
    from models.ensemble import fuse
    from serve.inputs import InputLimits, decode_upload
    from serve.model_source import materialize, resolve_source
    from serve.preprocess import Preprocessor, PreprocessSpec
    from serve.replicas import probabilities

    torch.set_num_threads(1)  # as one replica has
    limits = InputLimits.from_serve_config(cfg.serve.max_upload_mb, cfg.serve.max_pixels, cfg.serve.dicom_modalities)
    models, preprocess = {}, {}
    for role in ("cnn", "vit"):
        directory, _ = materialize(resolve_source(cfg, role))
        payload = load_checkpoint(directory)
        models[role] = model_from_checkpoint(directory, payload)
        preprocess[role] = Preprocessor(PreprocessSpec.from_checkpoint_meta(payload))
    w_cnn = load_settings(cfg).w_cnn

    def send(index: int) -> dict:
        gray, _ = decode_upload(images[index % len(images)], limits)
        p_cnn = probabilities(models["cnn"], preprocess["cnn"](gray)[None], "cpu")
        if mode == "ensemble":
            p_vit = probabilities(models["vit"], preprocess["vit"](gray)[None], "cpu")
            fuse(p_cnn, p_vit, w_cnn)
        return {}

    return send


def http_sender(url: str, images: list[bytes], mode: str) -> Callable[[int], dict | None]:
    local = threading.local()

    def send(index: int) -> dict | None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        answer = session.post(f"{url}/v1/predict", params={"mode": mode}, data=images[index % len(images)], timeout=60)
        return answer.json() if answer.status_code == 200 else None

    return send


def deploy(cfg: Config, batched: bool) -> str:
    from ray import serve

    from serve.app import build_app

    if not batched:
        cfg = cfg.model_copy(deep=True)
        cfg.serve.cnn.batch_max_size = cfg.serve.vit.batch_max_size = 1
    serve.run(build_app(cfg), name="cxr", route_prefix="/")
    url = f"http://127.0.0.1:{cfg.serve.port}"
    from pipelines.serve_cmd import wait_ready

    if not wait_ready(url):
        raise RuntimeError(f"{url} never became ready")
    return url


def run(cfg: Config, clients: int, seconds: float, max_requests: int, n_images: int) -> list[tuple[str, dict]]:
    from ray import serve

    images = sample_images(cfg, n_images)
    rows: list[tuple[str, dict]] = []

    def cell(name: str, send: Callable, n_clients: int) -> None:
        closed_loop(send, n_clients, 1.0, 20)  # warm-up: first batches, thread pools, connections
        rows.append((name, closed_loop(send, n_clients, seconds, max_requests)))
        print(f"  {name:<28}{rows[-1][1]['rate']:>8.1f} req/s  p50 {rows[-1][1]['p50']:.1f} ms", flush=True)

    for mode in ("cnn", "ensemble"):
        cell(f"direct {mode}", direct_sender(cfg, images, mode), 1)
    ensure_ray(cfg)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    url = deploy(cfg, batched=True)
    for mode in ("cnn", "ensemble", "adaptive"):
        for n in (1, clients):
            cell(f"serve {mode}", http_sender(url, images, mode), n)
    url = deploy(cfg, batched=False)
    for n in (1, clients):
        cell("serve adaptive, unbatched", http_sender(url, images, "adaptive"), n)
    serve.shutdown()
    return rows


def table(rows: list[tuple[str, dict]]) -> str:
    lines = [
        "| path | clients | requests | req/s | p50 ms | p95 ms | p99 ms | ViT share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        share = f"{r['vit_fraction']:.0%}" if "adaptive" in name else ""
        lines.append(
            f"| {name} | {r['clients']} | {r['requests']} | {r['rate']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | "
            f"{r['p99']:.1f} | {share} |"
        )
    return "\n".join(lines)


def targets(rows: list[tuple[str, dict]], clients: int) -> list[str]:
    def find(name: str, n: int) -> dict:
        return next(r for label, r in rows if label == name and r["clients"] == n)

    adaptive, ensemble = find("serve adaptive", clients), find("serve ensemble", clients)
    unbatched = find("serve adaptive, unbatched", clients)
    overhead = find("serve cnn", 1)["p50"] - find("direct cnn", 1)["p50"]
    checks = [
        ("adaptive / always-ensemble throughput", adaptive["rate"] / ensemble["rate"], ">= 1.5x", 1.5),
        (f"batched / unbatched adaptive at {clients} clients", adaptive["rate"] / unbatched["rate"], ">= 1.5x", 1.5),
    ]
    lines = [
        f"- {what}: {value:.2f}x (target {goal}): {'met' if value >= need else 'NOT met'}"
        for what, value, goal, need in checks
    ]
    lines.append(
        f"- Serve p50 overhead over the direct call, CNN, 1 client: {overhead:.1f} ms (target <= 10 ms): "
        f"{'met' if overhead <= 10 else 'NOT met'}"
    )
    return lines


def write_results(text: str) -> None:
    current = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    pattern = re.compile(r"\n## Serving.*?(?=\n## |\Z)", re.S)
    section = "\n" + text.rstrip() + "\n"
    updated = pattern.sub(lambda _: section, current) if pattern.search(current) else current.rstrip() + "\n" + section
    RESULTS.write_text(updated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxr bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the loaded cells")
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget per cell")
    parser.add_argument("--max-requests", type=int, default=2000, help="request budget per cell")
    parser.add_argument("--images", type=int, default=256, help="distinct test images cycled through")
    parser.add_argument("--write", action="store_true", help=f"replace the Serving section of {RESULTS}")
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    settings = load_settings(cfg)
    rows = run(cfg, args.clients, args.seconds, args.max_requests, args.images)
    command = "cxr bench serve " + " ".join(argv if argv is not None else sys.argv[2:])
    body = "\n".join(
        [
            f"`{command.strip()}`: {cfg.model.cnn.name} / {cfg.model.vit.name} at {cfg.model.input_size} px, "
            f"gate threshold {settings.threshold} (from {settings.source}), w_cnn {settings.w_cnn}; "
            f"{args.seconds:.0f} s per cell, closed-loop clients on 127.0.0.1.",
            "",
            table(rows),
            "",
            *targets(rows, args.clients),
        ]
    )
    print(body)
    if args.write:
        write_results("## Serving: Ray Serve vs in-process (`cxr bench serve`)\n\n" + body)
        print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
