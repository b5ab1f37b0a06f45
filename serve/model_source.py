"""Where a served model's weights come from: a checkpoint directory or an MLflow registered model version.

``resolve_source`` runs where the app is built and only reads small JSON files (``latest-<role>.json``); it never
loads weights or queries MLflow. ``materialize`` runs inside the model replica: it returns a local checkpoint
directory, downloading the registered version's artifacts from MLflow when that is the source.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from models.errors import CxrError
from pipelines.artifacts import latest_export, latest_training, tracking_uri
from pipelines.config import Config

log = logging.getLogger(__name__)


class ModelSourceError(CxrError, FileNotFoundError):
    """No usable weights for a role: the message says what was looked for and how to provide it."""


def resolve_source(cfg: Config, role: str, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """A plain dict (it travels to the replica as a deployment argument) naming the weights of ``role``.

    Precedence: an explicit ``checkpoint`` argument (``cxr serve --cnn DIR``), then ``serve.<role>.checkpoint``,
    then ``serve.<role>.registered_model``, then the best checkpoint of the last ``cxr train --model <role>``.
    """
    deployment = getattr(cfg.serve, role)
    uri = tracking_uri(cfg) if cfg.mlflow.tracking_uri or Path(cfg.train.run_dir).is_dir() else None
    source: dict[str, Any] = {"role": role, "checkpoint": None, "registered_model": None, "tracking_uri": uri}
    source.update(resolve_backend(cfg, role))
    if checkpoint is not None or deployment.checkpoint is not None:
        path = Path(checkpoint if checkpoint is not None else deployment.checkpoint).resolve()
        if not (path / "checkpoint.pt").is_file():
            raise ModelSourceError(f"{role}: no checkpoint.pt in {path}")
        return {**source, "checkpoint": str(path), "version": path.name}
    if deployment.registered_model is not None:
        return {**source, "registered_model": deployment.registered_model, "version": deployment.registered_model}
    try:
        summary = latest_training(cfg, role)
    except FileNotFoundError as err:
        raise ModelSourceError(
            f"{role}: {err}; or set serve.{role}.checkpoint / serve.{role}.registered_model"
        ) from None
    return {
        **source,
        "checkpoint": summary["best_checkpoint"],
        "version": summary.get("registered_model") or Path(summary["best_checkpoint"]).name,
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "tracking_uri": summary.get("mlflow_tracking_uri") or uri,
    }


def resolve_backend(cfg: Config, role: str) -> dict[str, Any]:
    """``backend`` and, for onnx, the ``onnx_model`` path: ``serve.<role>.onnx_model``, else the latest export of
    ``role`` (``<export.out_dir>/latest-<role>.json``). The replica checks the file against its checkpoint."""
    deployment = getattr(cfg.serve, role)
    if deployment.backend != "onnx":
        return {"backend": deployment.backend, "onnx_model": None}
    if deployment.onnx_model is not None:
        path = Path(deployment.onnx_model).resolve()
        if not path.is_file():
            raise ModelSourceError(f"{role}: serve.{role}.onnx_model {path} not found")
        return {"backend": "onnx", "onnx_model": str(path)}
    try:
        found = latest_export(cfg, role)
    except FileNotFoundError as err:
        hint = f"or set serve.{role}.onnx_model"
        raise ModelSourceError(f"{role}: serve.{role}.backend is onnx but {err}; {hint}") from None
    return {"backend": "onnx", "onnx_model": found["path"], "onnx_sha256": found.get("sha256")}


def materialize(source: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """(local checkpoint directory, extra facts such as the MLflow run id) for a source from ``resolve_source``."""
    if source.get("checkpoint"):
        path = Path(source["checkpoint"])
        if not (path / "checkpoint.pt").is_file():
            raise ModelSourceError(f"{source['role']}: no checkpoint.pt in {path} on this node")
        return path, {"mlflow_run_id": source.get("mlflow_run_id")}
    return _download_registered(source)


def _download_registered(source: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    import mlflow  # only replicas serving a registered model pay for this import
    from mlflow.tracking import MlflowClient

    name, version = source["registered_model"].split("/")
    if source.get("tracking_uri"):
        mlflow.set_tracking_uri(source["tracking_uri"])
    client = MlflowClient()
    found = client.get_model_version(name, version)
    target = Path(tempfile.mkdtemp(prefix=f"cxr-{source['role']}-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=found.source, dst_path=str(target)))
    log.info("%s: registered model %s/%s downloaded from %s", source["role"], name, version, found.source)
    if not (local / "checkpoint.pt").is_file():
        raise ModelSourceError(f"{name}/{version}: artifacts at {found.source} hold no checkpoint.pt")
    return local, {"mlflow_run_id": found.run_id}


def read_meta(checkpoint_dir: Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json``: everything but the tensors."""
    return json.loads((Path(checkpoint_dir) / "meta.json").read_text())
