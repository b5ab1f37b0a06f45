"""`cxr bench export`: PyTorch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8 (dynamic, static), in one run.

Per model: images/s at batch 1 and 16 on ONE thread (torch and ORT alike, as a 1-CPU Serve replica runs), the
model file's size, and on the test split each head's main figure (macro AUROC of a multi-label head, accuracy of a
multi-class one; the heads are the checkpoint's label spaces) with its drop vs PyTorch.
Two model sets:
  (a) full-size ``efficientnet_b0`` / ``vit_small_patch16_224`` at 224 px with random weights: throughput and size
      only (the quality of random weights means nothing); static int8 is calibrated on validation images at 224 px;
  (b) the demo-trained models (``latest-<role>.json`` of ``make demo``, or ``--cnn/--vit``): speed and quality.
Then Serve, CNN-only, ``--clients`` closed-loop clients on the real PNGs of ``--images-dir``, the full-size CNN at
224 px with ``serve.cnn.backend`` torch vs onnx (fp32 and static int8), the result cache off so every request
computes. Last, ``serve.bench.result_cache.cache_throughput``. ``--write``: the figures go to
their own section of benchmarks/RESULTS.md. ``--tiny``: timm's ``test_efficientnet`` / ``test_vit`` at 64 px in
place of (a), a quick smoke run of the whole benchmark (what the tests run; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.labels import LabelSpace
from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.data.shards import first_batches
from pipelines.export import eval_transform
from serve.bench.result_cache import cache_throughput
from serve.bench.serving import (
    REAL_NIH,
    TINY,
    closed_loop,
    deploy,
    files_in,
    full_size_checkpoints,
    http_sender,
)
from serve.bench.serving import write_results as write_section

TITLE = "## ONNX Runtime and int8 vs PyTorch (`cxr bench export`)"
BACKENDS = ("torch fp32", "ort fp32", "ort int8 dynamic", "ort int8 static")
BATCHES = (1, 16)


# ------------------------------------------------------------------------------------------ the models


def prepare(cfg: Config, role: str, checkpoint: Path, folder: Path) -> dict[str, Any]:
    """Load the checkpoint; export fp32 ONNX and quantise it both ways. Returns the model and the file per backend."""
    from models.checkpoint import PreprocessSpec, load_checkpoint, model_from_checkpoint
    from models.onnx_export import build_metadata, export_onnx, quantize_int8

    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(checkpoint, payload)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.pt"
    _save_weights(model, weights)
    storage = PreprocessSpec.from_checkpoint_meta(payload).storage_size
    fp32 = export_onnx(model, folder / "model.onnx", build_metadata(payload, checkpoint, storage))
    spec = eval_transform(payload, labelled=True)
    calibration = first_batches(cfg.data.shards_dir, "val", spec, cfg.export.calibration_batches, cfg.export.batch_size)
    dynamic = quantize_int8(fp32, folder / "int8-dynamic.onnx", "dynamic", None, list(cfg.export.dynamic_op_types))
    static_ops = list(cfg.export.static_op_types.get(role, []))
    static = quantize_int8(fp32, folder / "int8-static.onnx", "static", calibration, static_ops)
    files = dict(zip(BACKENDS, (weights, fp32, dynamic, static), strict=True))
    return {
        "role": role,
        "arch": payload["arch"],
        "spaces": model.label_spaces,
        "model": model,
        "payload": payload,
        "files": files,
        "spec": spec,
        "shards_dir": cfg.data.shards_dir,
    }


def _save_weights(model, path: Path) -> None:
    import torch

    torch.save(model.state_dict(), path)  # what PyTorch serving loads: the fp32 weights


def predictor(prepared: dict[str, Any], backend: str, threads: int | None) -> Callable[[np.ndarray], dict]:
    """batch -> probabilities, for one backend."""
    from models.onnx_export import onnx_logits, ort_session, probabilities_from_logits, torch_logits

    spaces = prepared["spaces"]
    if backend == "torch fp32":
        return lambda batch: probabilities_from_logits(torch_logits(prepared["model"], batch), spaces)
    session = ort_session(prepared["files"][backend], threads)
    return lambda batch: probabilities_from_logits(onnx_logits(session, batch), spaces)


# ----------------------------------------------------------------------------------------- measurements


def images_per_s(run: Callable[[np.ndarray], Any], batch: np.ndarray, seconds: float, min_calls: int = 2) -> float:
    calls, began = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - began < seconds:
        run(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - began)


def speed(prepared: dict[str, Any], seconds: float, rounds: int) -> dict[str, dict[int, float]]:
    """images/s per backend and batch size, one thread each: the best of ``rounds`` rounds that take turns
    between the backends, so load from other processes on a shared machine hits them alike."""
    import torch

    size = int(prepared["payload"]["preprocessing"]["input_size"])
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {backend: predictor(prepared, backend, threads=1) for backend in BACKENDS}
        found: dict[str, dict[int, float]] = {backend: dict.fromkeys(BATCHES, 0.0) for backend in BACKENDS}
        for b in BATCHES:
            batch = rng.integers(0, 256, (b, 1, size, size), dtype=np.uint8)
            for run in runs.values():
                run(batch)  # warm-up: allocations, ORT's first-run planning
            for _ in range(rounds):
                for backend, run in runs.items():
                    found[backend][b] = max(found[backend][b], images_per_s(run, batch, seconds / rounds))
        for backend in BACKENDS:
            print(f"    {prepared['arch']:<24}{backend:<18}" + "".join(f"{found[backend][b]:>9.1f}" for b in BATCHES))
    finally:
        torch.set_num_threads(threads)
    return found


def main_figure(space: LabelSpace) -> str:
    """The headline key a head is judged by here: macro AUROC (multi-label) or accuracy (multi-class)."""
    return f"{space.head}_macro_auroc" if space.multi_label else f"{space.head}_accuracy"


def quality(prepared: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``headline`` figures on the whole test split per backend (each image on its own head)."""
    from models.labels import label_key
    from pipelines.data.shards import local_batches, shard_files
    from pipelines.evaluate.metrics import headline

    spaces = prepared["spaces"]
    batches = list(local_batches(shard_files(prepared["shards_dir"], "test"), prepared["spec"], False, 64))
    keys = ["source", *(label_key(space.head) for space in spaces)]
    labels = {k: np.concatenate([b[k].numpy() for b in batches]) for k in keys}
    found = {}
    for backend in BACKENDS:
        run = predictor(prepared, backend, threads=None)
        probs = [run(b["image"].numpy()) for b in batches]
        pred = {**labels, **{s.head: np.concatenate([p[s.head] for p in probs]) for s in spaces}}
        found[backend] = headline(pred, spaces)
    return found


def model_rows(
    cfg: Config, model_set: str, checkpoints: dict[str, Path], scratch: Path, seconds: float, rounds: int
) -> list[dict]:
    rows = []
    for role, checkpoint in checkpoints.items():
        prepared = prepare(cfg, role, checkpoint, scratch / model_set / role)
        fast = speed(prepared, seconds, rounds)
        scores = quality(prepared) if model_set == "demo" else {}
        for backend in BACKENDS:
            rows.append(
                {
                    "set": model_set,
                    "arch": prepared["arch"],
                    "input_size": int(prepared["payload"]["preprocessing"]["input_size"]),
                    "backend": backend,
                    "mb": prepared["files"][backend].stat().st_size / 1e6,
                    "rate": fast[backend],
                    "vs_torch": fast[backend][1] / fast["torch fp32"][1],
                    "figures": [main_figure(space) for space in prepared["spaces"]],
                    "quality": scores.get(backend),
                    "drop": _drop(scores, backend),
                }
            )
    return rows


def _drop(scores: dict[str, dict[str, float]], backend: str) -> dict[str, float] | None:
    if not scores:
        return None
    base, here = scores["torch fp32"], scores[backend]
    return {k: base[k] - here[k] for k in base}


# ----------------------------------------------------------------------------------------------- Serve


def serve_cells(
    cfg: Config, checkpoints: dict[str, Path], onnx: dict[str, Path], images: list[bytes], clients: int, seconds: float
) -> list[tuple[str, dict]]:
    """CNN-only over HTTP with the torch backend, then the onnx backend on each file of ``onnx``; cache off."""
    from ray import serve

    from pipelines.runtime import ensure_ray

    cells = []
    ensure_ray(cfg)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    try:
        for name, path in [("torch", None), *onnx.items()]:
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.serve.cache.enabled = False  # repeated images would be answered from the cache
            run_cfg.serve.cnn.backend = "torch" if path is None else "onnx"
            run_cfg.serve.cnn.onnx_model = path
            url = deploy(run_cfg, batched=True, checkpoints=checkpoints)
            send = http_sender(url, images, "cnn", None)
            closed_loop(send, clients, 1.0, 40)  # warm-up
            cells.append((f"serve cnn, backend {name}", closed_loop(send, clients, seconds, 100_000)))
            print(f"  serve cnn {name:<22}{cells[-1][1]['rate']:>8.1f} req/s  p50 {cells[-1][1]['p50']:.1f} ms")
    finally:
        serve.shutdown()
    return cells


# ---------------------------------------------------------------------------------------------- report


def model_table(rows: list[dict]) -> str:
    """One row per model and backend; the quality column lists each head's main figure (and its drop)."""
    lines = [
        "| set | model | px | backend | file MB | img/s b1 | img/s b16 | b1 vs torch | test split, per head (drop) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        q, d = r["quality"], r["drop"]
        figures = "; ".join(f"{k} {q[k]:.4f} ({d[k]:+.4f})" for k in r["figures"]) if q else "n/a"
        lines.append(
            f"| {r['set']} | {r['arch']} | {r['input_size']} | {r['backend']} | {r['mb']:.1f} | {r['rate'][1]:.1f} "
            f"| {r['rate'][16]:.1f} | {r['vs_torch']:.2f}x | {figures} |"
        )
    return "\n".join(lines)


def serve_table(cells: list[tuple[str, dict]]) -> str:
    lines = ["| path | clients | requests | req/s | p50 ms | p95 ms |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [
        f"| {n} | {r['clients']} | {r['requests']} | {r['rate']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} |"
        for n, r in cells
    ]
    return "\n".join(lines)


def targets(rows: list[dict], cells: list[tuple[str, dict]], clients: int) -> list[str]:
    lines = []
    full = [r for r in rows if r["set"] == "full-size" and "int8" in r["backend"]]
    demo = {(r["arch"], r["backend"]): r for r in rows if r["set"] == "demo"}
    for r in full:
        lines.append(
            f"- {r['arch']} {r['backend']} at batch 1: {r['vs_torch']:.2f}x torch fp32 (target >= 2x): "
            f"{'met' if r['vs_torch'] >= 2 else 'NOT met'}"
        )
    for (arch, backend), r in demo.items():
        if "int8" in backend:
            # the target is on AUROC (multi-label heads); accuracy drops are reported beside it
            parts = []
            for key in r["figures"]:
                drop = r["drop"][key]
                verdict = f" (target <= 0.01): {'met' if drop <= 0.01 else 'NOT met'}" if "auroc" in key else ""
                parts.append(f"{key} drop {drop:+.4f}{verdict}")
            lines.append(f"- demo {arch} {backend}: " + "; ".join(parts))
    for name, r in cells:
        if "onnx" in name:
            lines.append(
                f"- {name}, {clients} clients: {r['rate']:.1f} req/s (target > 13.6): "
                f"{'met' if r['rate'] > 13.6 else 'NOT met'}"
            )
    return lines


def demo_checkpoints(cfg: Config, given: dict[str, Path | None]) -> dict[str, Path]:
    from pipelines.artifacts import latest_checkpoint

    found = {}
    for role, path in given.items():
        try:
            found[role] = path or latest_checkpoint(cfg, role)
        except FileNotFoundError as err:
            raise SystemExit(
                f"cxr bench export: {err}\nthe demo-trained models come from `make demo` "
                f"(or `cxr train --profile demo --model {role}`); or pass --{role} CHECKPOINT_DIR"
            ) from None
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=4.0, help="time per throughput cell (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per cell, best kept (%(default)s)")
    parser.add_argument("--serve-seconds", type=float, default=10.0, help="time per Serve cell (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop HTTP clients of the Serve cells")
    parser.add_argument("--images-dir", type=Path, default=REAL_NIH, help="real PNGs for the Serve cells")
    parser.add_argument("--cnn", type=Path, help="demo CNN checkpoint (default: latest-cnn.json of the config)")
    parser.add_argument("--vit", type=Path, help="demo ViT checkpoint (default: latest-vit.json of the config)")
    parser.add_argument("--no-serve", action="store_true", help="skip the Serve cells")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"{' / '.join(TINY.values())} at 64 px instead of the full-size models: a quick smoke run of the "
        "whole benchmark (the tests' size; its figures mean nothing)",
    )
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")


def run(args: argparse.Namespace, cfg: Config) -> int:
    demo = demo_checkpoints(cfg, {"cnn": args.cnn, "vit": args.vit})
    load_before = os.getloadavg()
    print("images/s on 1 thread:" + " " * 24 + "".join(f"{'batch ' + str(b):>9}" for b in BATCHES))
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        big = "tiny" if args.tiny else "full-size"
        sizes = (TINY, 64, 64) if args.tiny else ()
        full = full_size_checkpoints(scratch / "checkpoints", *sizes)
        rows = model_rows(cfg, big, full, scratch, args.seconds, args.rounds)
        rows += model_rows(cfg, "demo", demo, scratch, args.seconds, args.rounds)
        cells: list[tuple[str, dict]] = []
        if not args.no_serve:
            images = files_in(args.images_dir, 256)
            cnn = scratch / big / "cnn"
            onnx = {"onnx fp32": cnn / "model.onnx", "onnx int8 static": cnn / "int8-static.onnx"}
            cells = serve_cells(cfg, full, onnx, images, args.clients, args.serve_seconds)
            cache = cache_throughput(cfg, images, args.clients, 0.5)
        else:
            cache = None
    load_after = os.getloadavg()
    body = report(rows, cells, cache, args, demo, (load_before, load_after))
    print(body)
    if args.write:
        write_section(TITLE, TITLE + "\n\n" + body)
        print("written to benchmarks/RESULTS.md")
    return 0


def report(rows, cells, cache, args, demo, loads) -> str:
    cpu = _cpu_name()
    lines = [
        f"`{args.command_line}`: {os.cpu_count()} cores ({cpu}), load average {loads[0][0]:.2f} before / "
        f"{loads[1][0]:.2f} after. Throughput on ONE thread for every backend (torch.set_num_threads(1), ORT "
        f"intra_op_num_threads=1), as a Serve replica with num_cpus 1 runs; random uint8 images; best of "
        f"{args.rounds} rounds that take turns between the backends ({args.seconds:g} s per cell in all). Full-size "
        f"models have random weights: throughput and size only. Demo models: {demo['cnn']} and {demo['vit']}, "
        f"quality on the whole test split (drop = torch - backend).",
        "",
        model_table(rows),
    ]
    if cells:
        lines += [
            "",
            f"Serve, `?mode=cnn`, {args.clients} closed-loop clients, {len(files_in(args.images_dir, 256))} real PNGs "
            f"from {args.images_dir}, full-size CNN at 224 px, result cache off, {args.serve_seconds:.0f} s per cell:",
            "",
            serve_table(cells),
        ]
    if cache:
        lines += ["", "Result cache (`serve.bench.result_cache.cache_throughput`, 50% repeats):", ""]
        lines += [_figure(k, v) for k, v in cache.items() if not isinstance(v, dict | list)]
    lines += ["", *targets(rows, cells, args.clients)]
    return "\n".join(lines)


def _figure(key: str, value: Any) -> str:
    return f"- {key}: {value:.3g}" if isinstance(value, float) else f"- {key}: {value}"


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    """`cxr bench export`; also `python -m serve.bench.export` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
