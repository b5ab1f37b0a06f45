"""`cxr bench serve`: throughput and latency of the Serve app against the models called in-process, in one run.

Closed-loop clients on 127.0.0.1 (each sends its next request when the last one is answered), bounded by
``--seconds`` per cell and ``--max-requests``. Cells:
  direct        the same decode + preprocess + forward in this process, one image at a time (the limit)
  serve floor   Ray Serve's own cost in the app's topology with no work in it (``serve.bench.floor``)
  serve cnn     ?mode=cnn, 1 and ``--clients`` clients
  serve ensemble ?mode=ensemble (both models every time)
  serve adaptive the gate at the tuned threshold (ensemble.yaml) or the config's
  unbatched     adaptive with ``batch_max_size=1`` on both models (the app is redeployed for it)
Images: the demo's synthetic test split (PNG bytes from the shards), or the files of ``--images-dir``.
``--full-size``: the production-size models in ONNX Runtime on real radiographs, with cells of their own
(``serve.bench.full_size``). The table goes to stdout and, with ``--write``, into a section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import requests

from pipelines.artifacts import load_settings
from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.data.shards import manifest_label_spaces, shard_files
from pipelines.runtime import ensure_ray

RESULTS = Path("benchmarks/RESULTS.md")


FULL_SIZE = {"cnn": "efficientnet_b0", "vit": "vit_small_patch16_224"}
TINY = {"cnn": "test_efficientnet", "vit": "test_vit"}  # timm's test models, for smoke runs of a benchmark
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}
REAL_NIH = Path("../shared/real_samples/nih/images")  # 75 real 1024 px NIH PNGs, beside the project


def files_in(folder: Path, limit: int) -> list[bytes]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise FileNotFoundError(f"no PNG, JPEG or DICOM files in {folder}")
    return [p.read_bytes() for p in paths]


def full_size_checkpoints(
    folder: Path, archs: dict[str, str] = FULL_SIZE, input_size: int = 224, storage_size: int = 256
) -> dict[str, Path]:
    """Untrained production-size networks (224 px, stored images 256 px) saved as our checkpoints; ``archs`` and
    the sizes swap in others (``cxr bench export --tiny``: timm's test models at 64 px)."""
    from models.checkpoint import save_checkpoint
    from models.factory import build_model
    from pipelines.data.datasets import default_label_spaces

    config = {"data": {"storage_size": storage_size}, "model": {"input_size": input_size}}
    return {
        role: save_checkpoint(
            folder / role,
            build_model(arch, input_size, default_label_spaces()),
            role=role,
            epoch=0,
            config=config,
            metrics={},
        )
        for role, arch in archs.items()
    }


def sample_images(cfg: Config, limit: int) -> tuple[list[bytes], list[str]]:
    """Test-split images (stored PNGs) and the head each is scored on, as evaluation and tuning score it."""
    images: list[bytes] = []
    heads: list[str] = []
    head_of = {space.source: space.head for space in manifest_label_spaces(cfg.data.shards_dir)}
    for file in shard_files(cfg.data.shards_dir, "test"):
        table = pq.read_table(file, columns=["image", "source"])
        images += table.column("image").to_pylist()
        heads += [head_of[source] for source in table.column("source").to_pylist()]
        if len(images) >= limit:
            break
    return images[:limit], heads[:limit]


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

    from models.checkpoint import PreprocessSpec, load_checkpoint, model_from_checkpoint
    from models.ensemble import fuse
    from serve.inputs import InputLimits, decode_upload
    from serve.model_source import materialize, resolve_source
    from serve.preprocess import Preprocessor
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


def http_sender(url: str, images: list[bytes], mode: str, heads: list[str] | None) -> Callable[[int], dict | None]:
    local = threading.local()

    def send(index: int) -> dict | None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        params = {"mode": mode, **({"head": heads[index % len(heads)]} if heads else {})}
        answer = session.post(f"{url}/v1/predict", params=params, data=images[index % len(images)], timeout=60)
        return answer.json() if answer.status_code == 200 else None

    return send


def deploy(cfg: Config, batched: bool, checkpoints: dict[str, Path] | None = None, cache: bool = False) -> str:
    """Deploy the app and wait for it. The result cache is off unless ``cache``: the cells cycle through the same
    images, and must measure the models, not cache hits (``serve.bench.result_cache`` measures the cache). The
    out-of-distribution check, where the run has one, scores every image but refuses none: a refusal skips the
    models, so the real images some cells send would measure refusals, not answers."""
    from ray import serve

    from serve.app import build_app

    cfg = cfg.model_copy(deep=True)
    cfg.serve.cache.enabled = cache
    cfg.ood.enabled = False
    if not batched:
        cfg.serve.cnn.batch_max_size = cfg.serve.vit.batch_max_size = 1
    checkpoints = checkpoints or {}
    serve.run(build_app(cfg, checkpoints.get("cnn"), checkpoints.get("vit")), name="cxr", route_prefix="/")
    url = f"http://127.0.0.1:{cfg.serve.port}"
    from serve.cli import wait_ready

    if not wait_ready(url):
        raise RuntimeError(f"{url} never became ready")
    return url


def measure(
    cfg: Config, clients: int, seconds: float, max_requests: int, images: list[bytes], heads: list[str] | None = None
) -> list[tuple[str, dict]]:
    """All cells of the module docstring, on the trained models."""
    from ray import serve

    rows: list[tuple[str, dict]] = []

    def cell(name: str, send: Callable, n_clients: int) -> None:
        closed_loop(send, n_clients, 1.0, 20)  # warm-up: first batches, thread pools, connections
        rows.append((name, closed_loop(send, n_clients, seconds, max_requests)))
        print(f"  {name:<28}{rows[-1][1]['rate']:>8.1f} req/s  p50 {rows[-1][1]['p50']:.1f} ms", flush=True)

    for mode in ("cnn", "ensemble"):
        cell(f"direct {mode}", direct_sender(cfg, images, mode), 1)
    from serve.app import use_grpc_in_local_proxies
    from serve.bench.floor import build_floor

    use_grpc_in_local_proxies(cfg)
    ensure_ray(cfg)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})

    serve.run(build_floor(cfg), name="floor", route_prefix="/")
    cell("serve floor (no work)", http_sender(f"http://127.0.0.1:{cfg.serve.port}", images, "cnn", None), 1)
    serve.delete("floor")
    url = deploy(cfg, batched=True)
    for mode in ("cnn", "ensemble", "adaptive"):
        for n in (1, clients):
            cell(f"serve {mode}", http_sender(url, images, mode, heads), n)
    url = deploy(cfg, batched=False)
    for n in (1, clients):
        cell("serve adaptive, unbatched", http_sender(url, images, "adaptive", heads), n)
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
    direct_cnn, direct_ensemble = find("direct cnn", 1)["p50"], find("direct ensemble", 1)["p50"]
    overhead = find("serve cnn", 1)["p50"] - direct_cnn
    floor = find("serve floor (no work)", 1)["p50"]
    # adaptive / ensemble if serving cost nothing: the ensemble's model time over the CNN's plus the ViT's share
    ceiling = direct_ensemble / (direct_cnn + adaptive["vit_fraction"] * (direct_ensemble - direct_cnn))
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
    lines.append(
        f"- Ray Serve's floor in this topology (proxy, ingress, one handle call, no work), 1 client: {floor:.1f} ms "
        f"p50; the app's own code adds {overhead - floor:.1f} ms over floor + direct call"
    )
    lines.append(
        f"- adaptive / always-ensemble with zero serving cost at this ViT share ({adaptive['vit_fraction']:.0%}), "
        f"from the direct calls: {ceiling:.2f}x"
    )
    return lines


def write_results(title: str, text: str) -> None:
    """Replace the section headed ``title`` (or append it); other sections stay as they are."""
    current = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    pattern = re.compile("\n" + re.escape(title) + r".*?(?=\n## |\Z)", re.S)
    section = "\n" + text.rstrip() + "\n"
    updated = pattern.sub(lambda _: section, current) if pattern.search(current) else current.rstrip() + "\n" + section
    RESULTS.write_text(updated)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the loaded cells")
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget per cell")
    parser.add_argument("--max-requests", type=int, default=2000, help="request budget per cell")
    parser.add_argument("--images", type=int, default=256, help="distinct test images cycled through")
    parser.add_argument(
        "--images-dir", type=Path, help=f"send these files instead of the shards' (--full-size: {REAL_NIH})"
    )
    parser.add_argument(
        "--full-size",
        action="store_true",
        help=f"random-weight {' / '.join(FULL_SIZE.values())} at 224 px in ONNX Runtime, on real images",
    )
    parser.add_argument(
        "--vit-share", type=float, default=0.46, help="--full-size: the adaptive gate's ViT share (the tuned demo's)"
    )
    parser.add_argument("--tiny", action="store_true", help="--full-size with timm's test models: a smoke run")
    parser.add_argument("--write", action="store_true", help=f"replace this run's Serving section of {RESULTS}")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.full_size:
        args.images_dir = args.images_dir or REAL_NIH
    if args.images_dir:
        images, heads = files_in(args.images_dir, args.images), None
    else:
        images, heads = sample_images(cfg, args.images)
    if args.full_size:
        from serve.bench import full_size

        title = "## Serving full-size models on real images (`cxr bench serve --full-size`)"
        with tempfile.TemporaryDirectory() as scratch:
            rows, facts = full_size.measure(
                cfg, images, args.clients, args.seconds, args.max_requests, args.vit_share, Path(scratch), args.tiny
            )
        about = full_size.describe(cfg, facts)
        checks = full_size.checks(rows, facts, args.clients)
    else:
        rows = measure(cfg, args.clients, args.seconds, args.max_requests, images, heads)
        title = "## Serving: Ray Serve vs in-process (`cxr bench serve`)"
        settings = load_settings(cfg)
        about = (
            f"{cfg.model.cnn.name} / {cfg.model.vit.name} at {cfg.model.input_size} px, gate threshold "
            f"{settings.threshold:.3f} (from {settings.source}), w_cnn {settings.w_cnn:.3f}"
        )
        checks = targets(rows, args.clients)
    source = str(args.images_dir) if args.images_dir else "the synthetic test split"
    body = "\n".join(
        [
            f"`{args.command_line}`: {about}; {len(images)} images from {source}; {args.seconds:.0f} s per cell, "
            "closed-loop clients on 127.0.0.1.",
            "",
            table(rows),
            "",
            *checks,
        ]
    )
    print(body)
    if args.write:
        write_results(title, title + "\n\n" + body)
        print(f"written to {RESULTS}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr bench serve`; also `python -m serve.bench.serving` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
