"""`cxr bench serve --full-size`: the production-size models on real radiographs, against this machine's limit.

Random-weight ``efficientnet_b0`` / ``vit_small_patch16_224`` at 224 px (speed does not depend on the weights), served
as a CPU machine serves them: the CNN in ONNX Runtime fp32, the ViT in ONNX Runtime int8 (dynamic quantisation of
MatMul/Gemm, whose nih14 AUROC drop `cxr bench export` measured at 0.0007), the result cache off. Cells, in one run:

  direct <mode>, 1 thread       decode + preprocess + forward in this process, one image at a time
  direct <mode>, N threads      the same on N threads at once (N: this machine's cores): the in-process limit
  serve <mode>                  cnn, ensemble and adaptive over HTTP, at 1 and ``--clients`` closed-loop clients
  serve adaptive [unbatched]    16 clients with ``@serve.batch`` as configured, then with ``batch_max_size`` 1

The adaptive gate's threshold is the quantile of the CNN's confidence on these images that sends ``--vit-share`` of
them to the ViT (the tuned demo gate's share): random weights have no tuned gate of their own. ``--tiny`` swaps in
timm's test models at 64 px: a smoke run of the whole benchmark, whose figures mean nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines.config import Config
from pipelines.runtime import ensure_ray
from serve.bench.serving import FULL_SIZE, TINY, closed_loop, deploy, full_size_checkpoints, http_sender

UNBATCHED_CLIENTS = 16
CNN_TARGET_RATE, CNN_TARGET_SHARE_OF_LIMIT = 45.0, 0.75  # req/s at --clients, and of the in-process limit
ENSEMBLE_TARGET_RATE = 20.0
ADAPTIVE_TARGET_RATIO = 1.5


def export_models(checkpoints: dict[str, Path], folder: Path, dynamic_op_types: list[str]) -> dict[str, Path]:
    """The CNN as fp32 ONNX, the ViT as dynamic int8 ONNX of ``dynamic_op_types`` (``export.dynamic_op_types``),
    each with its checkpoint's facts in the metadata."""
    from models.checkpoint import PreprocessSpec, load_checkpoint, model_from_checkpoint
    from models.onnx_export import build_metadata, export_onnx, quantize_int8

    files = {}
    for role, checkpoint in checkpoints.items():
        payload = load_checkpoint(checkpoint)
        storage = PreprocessSpec.from_checkpoint_meta(payload).storage_size
        model = model_from_checkpoint(checkpoint, payload)
        fp32 = export_onnx(model, folder / role / "model.onnx", build_metadata(payload, checkpoint, storage))
        int8 = folder / role / "int8.onnx"
        files[role] = fp32 if role == "cnn" else quantize_int8(fp32, int8, "dynamic", None, dynamic_op_types)
    return files


class DirectPath:
    """What a request costs without Serve: the router's decode and preprocessing, then the replicas' ONNX Runtime
    sessions (one intra-op thread each, as a 1-CPU replica runs), called in this process. Thread-safe."""

    def __init__(self, cfg: Config, checkpoints: dict[str, Path], files: dict[str, Path]) -> None:
        from models.checkpoint import PreprocessSpec, load_checkpoint
        from serve.inputs import InputLimits
        from serve.onnx_backend import OnnxRunner
        from serve.preprocess import Preprocessor

        self.limits = InputLimits.from_serve_config(
            cfg.serve.max_upload_mb, cfg.serve.max_pixels, cfg.serve.dicom_modalities
        )
        self.runners = {role: OnnxRunner(path, threads=1) for role, path in files.items()}
        self.preprocess = {
            role: Preprocessor(PreprocessSpec.from_checkpoint_meta(load_checkpoint(checkpoints[role])))
            for role in files
        }
        self.spaces = self.runners["cnn"].label_spaces

    def model_input(self, data: bytes, role: str) -> np.ndarray:
        from serve.inputs import decode_upload

        gray, _ = decode_upload(data, self.limits)
        return self.preprocess[role](gray)[None]

    def sender(self, images: list[bytes], mode: str, w_cnn: float) -> Callable[[int], dict]:
        from models.ensemble import fuse

        def send(index: int) -> dict:
            image = self.model_input(images[index % len(images)], "cnn")
            p_cnn = self.runners["cnn"](image)
            if mode == "ensemble":
                fuse(p_cnn, self.runners["vit"](image), w_cnn)
            return {}

        return send

    def gate_threshold(self, images: list[bytes], share: float) -> tuple[float, float]:
        """(threshold, the share it gives on ``images``): the gate escalates confidences below the threshold."""
        from models.ensemble import confidence
        from models.labels import by_head

        found = [float(confidence(self.runners["cnn"](self.model_input(data, "cnn")), by_head(self.spaces))[0])
                 for data in images]  # fmt: skip
        confidences = np.sort(np.array(found))
        count = int(round(share * len(confidences)))
        if count == 0:
            return float(confidences[0]), 0.0
        if count >= len(confidences):
            return float(np.nextafter(confidences[-1], np.inf)), 1.0
        threshold = float((confidences[count - 1] + confidences[count]) / 2)
        return threshold, float(np.mean(confidences < threshold))


def measure(
    cfg: Config,
    images: list[bytes],
    clients: int,
    seconds: float,
    max_requests: int,
    vit_share: float,
    scratch: Path,
    tiny: bool = False,
) -> tuple[list[tuple[str, dict]], dict]:
    """Every cell of the module docstring; returns the rows and the facts the checks read (threads, threshold)."""
    from ray import serve

    from serve.app import serve_logging, use_grpc_in_local_proxies

    archs, sizes = (TINY, (64, 64)) if tiny else (FULL_SIZE, (224, 256))
    checkpoints = full_size_checkpoints(scratch / "checkpoints", archs, *sizes)
    files = export_models(checkpoints, scratch / "onnx", list(cfg.export.dynamic_op_types))
    direct = DirectPath(cfg, checkpoints, files)
    threshold, share = direct.gate_threshold(images, vit_share)
    threads = len(os.sched_getaffinity(0))
    rows: list[tuple[str, dict]] = []

    def cell(name: str, send: Callable, n_clients: int) -> None:
        closed_loop(send, n_clients, 1.0, 20)  # warm-up: first batches, thread pools, connections
        rows.append((name, closed_loop(send, n_clients, seconds, max_requests)))
        row = rows[-1][1]
        print(f"  {name:<30}{n_clients:>3} {row['rate']:>8.1f} req/s  p50 {row['p50']:.1f} ms", flush=True)

    for mode in ("cnn", "ensemble"):
        for n in (1, threads):
            cell(f"direct {mode}", direct.sender(images, mode, cfg.ensemble.w_cnn), n)
    run_cfg = served_config(cfg, files, threshold, scratch)
    use_grpc_in_local_proxies(run_cfg)
    ensure_ray(run_cfg)
    serve.start(http_options={"host": "127.0.0.1", "port": run_cfg.serve.port}, logging_config=serve_logging())
    try:
        url = deploy(run_cfg, batched=True, checkpoints=checkpoints)
        for mode in ("cnn", "ensemble", "adaptive"):
            for n in sorted({1, clients, UNBATCHED_CLIENTS} if mode == "adaptive" else {1, clients}):
                cell(f"serve {mode}", http_sender(url, images, mode, None), n)
        url = deploy(run_cfg, batched=False, checkpoints=checkpoints)
        cell("serve adaptive, unbatched", http_sender(url, images, "adaptive", None), UNBATCHED_CLIENTS)
    finally:
        serve.shutdown()
    return rows, {"threads": threads, "threshold": threshold, "share": share, "archs": archs, "size": sizes[0]}


def served_config(cfg: Config, files: dict[str, Path], threshold: float, scratch: Path) -> Config:
    """The config the app is deployed with: ONNX Runtime backends on the exported files, the gate's threshold, and
    a run folder of its own (so no ensemble.yaml of an earlier training overrides the threshold)."""
    served = cfg.model_copy(deep=True)
    served.train.run_dir = scratch / "run"
    served.ensemble.threshold = threshold
    for role, path in files.items():
        settings = getattr(served.serve, role)
        settings.backend, settings.onnx_model = "onnx", path
    return served


def checks(rows: list[tuple[str, dict]], facts: dict, clients: int) -> list[str]:
    """The issue's targets at ``clients`` clients, each with its measured value, and the bound on adaptive."""

    def find(name: str, n: int) -> dict:
        return next(r for label, r in rows if label == name and r["clients"] == n)

    threads = facts["threads"]
    cnn, ensemble = find("serve cnn", clients), find("serve ensemble", clients)
    adaptive = find("serve adaptive", clients)
    limit = find("direct cnn", threads)["rate"]
    cnn_1, ensemble_1 = (1 / find(f"direct {mode}", 1)["rate"] for mode in ("cnn", "ensemble"))
    share = adaptive["vit_fraction"]
    bound = ensemble_1 / (cnn_1 + share * (ensemble_1 - cnn_1))  # adaptive / ensemble if serving cost nothing
    batched, unbatched = find("serve adaptive", UNBATCHED_CLIENTS), find("serve adaptive, unbatched", UNBATCHED_CLIENTS)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    ratio = adaptive["rate"] / ensemble["rate"]
    return [
        f"- CNN-only at {clients} clients: {cnn['rate']:.1f} req/s (target >= {CNN_TARGET_RATE:.0f}), "
        f"{cnn['rate'] / limit:.0%} of the in-process limit of {limit:.1f} img/s on {threads} threads "
        f"(target >= {CNN_TARGET_SHARE_OF_LIMIT:.0%}): "
        f"{verdict(cnn['rate'] >= CNN_TARGET_RATE and cnn['rate'] >= CNN_TARGET_SHARE_OF_LIMIT * limit)}",
        f"- always-ensemble at {clients} clients: {ensemble['rate']:.1f} req/s (target >= "
        f"{ENSEMBLE_TARGET_RATE:.0f}): {verdict(ensemble['rate'] >= ENSEMBLE_TARGET_RATE)}",
        f"- adaptive / always-ensemble at {clients} clients: {ratio:.2f}x at a ViT share of {share:.0%} (gate "
        f"threshold {facts['threshold']:.4f}; target >= {ADAPTIVE_TARGET_RATIO}x): "
        f"{verdict(ratio >= ADAPTIVE_TARGET_RATIO)}; the direct calls bound it at {bound:.2f}x at this share",
        f"- batched / unbatched adaptive at {UNBATCHED_CLIENTS} clients: {batched['rate'] / unbatched['rate']:.2f}x "
        f"({batched['rate']:.1f} vs {unbatched['rate']:.1f} req/s)",
    ]


def describe(cfg: Config, facts: dict) -> str:
    """One line on what was served with which resources."""
    s = cfg.serve
    archs = " / ".join(facts["archs"].values())
    return (
        f"{archs} at {facts['size']} px, random weights; CNN ONNX Runtime fp32, ViT ONNX Runtime int8 (dynamic); "
        f"router {s.router.num_cpus} CPU x {s.router.num_replicas}, CNN {s.cnn.num_cpus} CPU, ViT {s.vit.num_cpus} "
        f"CPU, batch up to {s.cnn.batch_max_size}/{s.vit.batch_max_size}; result cache off"
    )
