"""`cxr export --model cnn|vit --format onnx [--quantize dynamic|static]`: a checkpoint as ONNX, checked and logged.

Steps: the checkpoint (``--checkpoint DIR``, default the best of the last ``cxr train --model <role>``) -> ONNX with a
dynamic batch axis and preprocessing metadata (``models/onnx_export.py``) -> ``onnx.checker`` -> parity with PyTorch
on test-split batches built by the evaluation transform (max abs logit difference <= ``export.parity_atol``, else
the export fails) -> optionally int8 (dynamic, or static calibrated on validation batches) and its agreement with
fp32 -> ``<export.out_dir>/<role>/<run>-<checkpoint>/`` (``model.onnx``, ``model-int8-<mode>.onnx``,
``export.json``), logged to MLflow under ``onnx/`` beside the checkpoint (its training run when known), and
``<export.out_dir>/latest-<role>.json`` naming the newest export, which ``serve.<role>.backend: onnx`` serves.

Shards are read in this process with pyarrow (``pipelines.data.shards.first_batches``): no Ray is started.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import CxrError
from pipelines.artifacts import latest_checkpoint, latest_training, write_latest_export
from pipelines.cli import run_module
from pipelines.config import Config
from pipelines.data.shards import first_batches
from pipelines.data.transforms import TransformSpec

log = logging.getLogger(__name__)

ROLES = ("cnn", "vit")
FP32_FILE = "model.onnx"
REPORT_FILE = "export.json"


class ExportError(CxrError, ValueError):
    """A checkpoint that cannot be exported as asked (wrong role, ...); the message names it."""


# ------------------------------------------------------------------------------------------- summaries


# --------------------------------------------------------------------------------------------- batches


def eval_transform(payload: dict[str, Any], labelled: bool = False) -> TransformSpec:
    """The evaluation transform of a checkpoint: resize to the input size it was trained at; ``labelled``: the
    batches also carry ``source`` and each head's labels, for the checkpoint's label spaces (its heads)."""
    from models.checkpoint import label_spaces_of

    spaces = label_spaces_of(payload) if labelled else ()
    return TransformSpec(int(payload["preprocessing"]["input_size"]), spaces)


# ---------------------------------------------------------------------------------------------- export


def export(cfg: Config, role: str, checkpoint: Path | None = None, quantize: str | None = None) -> dict[str, Any]:
    """Export one checkpoint; returns the summary also written to ``export.json`` and ``latest-<role>.json``."""
    from models.checkpoint import PreprocessSpec, load_checkpoint, model_from_checkpoint
    from models.onnx_export import OnnxExportError, build_metadata, export_onnx, logit_parity, ort_session

    checkpoint = Path(checkpoint or latest_checkpoint(cfg, role)).resolve()
    payload = load_checkpoint(checkpoint)
    if payload.get("role", role) != role:
        raise ExportError(f"{checkpoint}: a {payload['role']} checkpoint, not {role} (--model {role})")
    model = model_from_checkpoint(checkpoint, payload)
    folder = Path(cfg.export.out_dir).resolve() / role / f"{checkpoint.parent.name}-{checkpoint.name}"
    for stale in folder.glob("model-int8-*.onnx"):  # an earlier export's int8 must not be logged with this one
        stale.unlink()
    storage = PreprocessSpec.from_checkpoint_meta(payload).storage_size
    began = time.perf_counter()
    fp32 = export_onnx(model, folder / FP32_FILE, build_metadata(payload, checkpoint, storage))
    log.info("%s: exported in %.1f s", fp32, time.perf_counter() - began)
    spec = eval_transform(payload)
    batches = first_batches(cfg.data.shards_dir, "test", spec, cfg.export.parity_batches, cfg.export.batch_size)
    session = ort_session(fp32)
    parity = logit_parity(model, session, batches)
    if parity["max_abs_logit_diff"] > cfg.export.parity_atol:
        raise OnnxExportError(
            f"{fp32}: max abs logit difference to PyTorch {parity['max_abs_logit_diff']:.3g} over "
            f"{parity['images']} test images exceeds export.parity_atol {cfg.export.parity_atol:g}"
        )
    summary = {
        "role": role,
        "arch": payload["arch"],
        "format": "onnx",
        "quantize": quantize,
        "source_checkpoint": str(checkpoint),
        "fp32": _file_facts(fp32),
        "parity": {**parity, "atol": cfg.export.parity_atol, "split": "test"},
        "int8": _quantized(cfg, spec, role, fp32, session, batches, quantize) if quantize else None,
        "opset": _opset(fp32),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }
    chosen = summary["int8"] or summary["fp32"]
    summary.update({"path": chosen["path"], "sha256": chosen["sha256"], "size_bytes": chosen["size_bytes"]})
    (folder / REPORT_FILE).write_text(json.dumps(summary, indent=2))
    summary.update(_log_to_mlflow(cfg, payload, folder, summary))
    (folder / REPORT_FILE).write_text(json.dumps(summary, indent=2))
    write_latest_export(cfg, role, summary)
    return summary


def _quantized(
    cfg: Config, spec: TransformSpec, role: str, fp32: Path, session, batches: list[np.ndarray], mode: str
) -> dict[str, Any]:
    """The int8 model of ``mode`` beside ``fp32`` and how closely it agrees with it on the parity batches."""
    from models.onnx_export import agreement, ort_session, quantize_int8

    calibration = None
    if mode == "static":
        size = cfg.export.batch_size
        calibration = first_batches(cfg.data.shards_dir, "val", spec, cfg.export.calibration_batches, size)
    began = time.perf_counter()
    target = fp32.with_name(f"model-int8-{mode}.onnx")
    op_types = cfg.export.dynamic_op_types if mode == "dynamic" else cfg.export.static_op_types.get(role, [])
    quantize_int8(fp32, target, mode, calibration, list(op_types))
    log.info("%s: quantised (%s) in %.1f s", target, mode, time.perf_counter() - began)
    agreed = agreement(session, ort_session(target), batches)
    facts = {**_file_facts(target), "mode": mode, "op_types": list(op_types) or "all", "agreement_with_fp32": agreed}
    if mode == "static":
        facts["calibration"] = {"split": "val", "images": int(sum(len(b) for b in calibration or []))}
    return facts


def _file_facts(path: Path) -> dict[str, Any]:
    from models.checkpoint import file_sha256

    return {"path": str(path), "sha256": file_sha256(path), "size_bytes": path.stat().st_size}


def _opset(path: Path) -> int:
    import onnx

    imports = onnx.load(str(path), load_external_data=False).opset_import
    return int(next(o.version for o in imports if o.domain in ("", "ai.onnx")))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


# ---------------------------------------------------------------------------------------------- MLflow


def _source_run(cfg: Config, payload: dict[str, Any], checkpoint: str) -> tuple[str | None, str | None]:
    """(run id, tracking URI) of the training run the checkpoint came from, when its meta or latest-<role>.json
    says; (None, None) otherwise."""
    run_id = (payload.get("state") or {}).get("mlflow_run_id") or None
    uri = ((payload.get("config") or {}).get("mlflow") or {}).get("tracking_uri")
    if run_id is None:
        try:
            summary = latest_training(cfg, payload.get("role", ""))
        except FileNotFoundError:
            return None, None
        if Path(summary["best_checkpoint"]).resolve() != Path(checkpoint):
            return None, None
        run_id, uri = summary.get("mlflow_run_id"), summary.get("mlflow_tracking_uri")
    if uri and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None, None  # a store that is not on this machine: opening it would create an empty one
    return run_id, uri


def _log_to_mlflow(cfg: Config, payload: dict[str, Any], folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Artifacts under ``onnx/`` and parity/agreement metrics in the checkpoint's run, or a new ``export-<role>``
    run when that run is unknown or not in the store."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.train import tracking

    run_id, uri = _source_run(cfg, payload, summary["source_checkpoint"])
    uri = uri or tracking.tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    if run_id is not None:
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            log.warning("MLflow run %s of %s not found in %s: logging to a new run", run_id, folder, uri)
            run_id = None
    if run_id is None:
        uri = tracking.tracking_uri(cfg)
        run_id = tracking.start_run(cfg, f"export-{summary['role']}", summary["role"])
        mlflow.set_tag("source_checkpoint", summary["source_checkpoint"])
        tracking.end_run()
    client.log_artifacts(run_id, str(folder), artifact_path="onnx")
    client.log_metric(run_id, "onnx_parity_max_abs_logit_diff", summary["parity"]["max_abs_logit_diff"])
    if summary["int8"]:
        agreed = summary["int8"]["agreement_with_fp32"]
        mode = summary["int8"]["mode"]
        for key in (k for k in agreed if k.endswith("_agreement")):  # one per head: <head>_top1/finding_agreement
            client.log_metric(run_id, f"onnx_int8_{mode}_{key}", agreed[key])
        client.log_metric(run_id, f"onnx_int8_{mode}_max_abs_prob_diff", agreed["max_abs_prob_diff"])
    return {"mlflow_run_id": run_id, "mlflow_tracking_uri": uri}


# ------------------------------------------------------------------------------------------------- CLI


def describe(summary: dict[str, Any]) -> list[str]:
    parity = summary["parity"]
    lines = [
        f"source checkpoint: {summary['source_checkpoint']}",
        f"fp32: {summary['fp32']['path']} ({summary['fp32']['size_bytes'] / 1e6:.1f} MB, opset {summary['opset']})",
        f"parity with PyTorch on {parity['images']} test images: max abs logit difference "
        f"{parity['max_abs_logit_diff']:.2e} (limit {parity['atol']:g})",
    ]
    if summary["int8"]:
        int8, agreed = summary["int8"], summary["int8"]["agreement_with_fp32"]
        per_head = ", ".join(f"{key} {value:.1%}" for key, value in agreed.items() if key.endswith("_agreement"))
        lines += [
            f"int8 ({int8['mode']}): {int8['path']} ({int8['size_bytes'] / 1e6:.1f} MB)",
            f"int8 vs fp32 on {agreed['images']} test images: {per_head} (top1: the top class, finding: each "
            f"class at 0.5), max abs probability difference {agreed['max_abs_prob_diff']:.3f} "
            f"(mean {agreed['mean_abs_prob_diff']:.4f})",
        ]
    lines.append(f"newest export: {summary['path']} (sha256 {summary['sha256'][:16]}...)")
    lines.append(f"MLflow run {summary['mlflow_run_id']} (artifacts under onnx/), {summary['mlflow_tracking_uri']}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from models.onnx_export import QUANTIZE_MODES

    parser.add_argument("--model", choices=ROLES, required=True, help="which network's checkpoint")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: %(default)s)")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, help="also write an int8 model and serve it")
    parser.add_argument(
        "--checkpoint", type=Path, help="checkpoint dir (default: best of the last `cxr train --model <role>`)"
    )


def run(args: argparse.Namespace, cfg: Config) -> int:
    summary = export(cfg, args.model, args.checkpoint, args.quantize)
    print("\n".join(describe(summary)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr export`; also `python -m pipelines.export` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
