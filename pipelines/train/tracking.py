"""MLflow tracking: one run per training run (rank 0 only), resumed with the training; the best checkpoint and
reports as artifacts; a registered model version per architecture (``cxr-cnn``, ``cxr-vit``).

Default store: SQLite under ``train.run_dir`` with artifacts beside it; ``mlflow.tracking_uri`` may name a server.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from pipelines.artifacts import tracking_uri
from pipelines.config import Config

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)


def ensure_experiment(cfg: Config) -> str:
    """Create the experiment from the driver (its local artifact folder is then under ``train.run_dir``)."""
    return _experiment_id(cfg)


def _experiment_id(cfg: Config) -> str:
    mlflow.set_tracking_uri(tracking_uri(cfg))
    found = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if found is not None:
        return found.experiment_id
    artifacts = None
    if tracking_uri(cfg).startswith("sqlite:"):  # a local store keeps its artifacts beside it, not in ./mlruns
        artifacts = (Path(cfg.train.run_dir).resolve() / "mlartifacts").as_uri()
    return mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=artifacts)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def start_run(
    cfg: Config, run_name: str, role: str, run_id: str | None = None, tags: dict[str, str] | None = None
) -> str:
    """Start (or resume, given ``run_id``) the MLflow run of a training run; logs params and config.yaml once.

    ``tags`` may carry ``mlflow.parentRunId``: a sweep's trials are then nested under the sweep's run.
    """
    experiment_id = _experiment_id(cfg)
    if run_id:
        mlflow.start_run(run_id=run_id)
        return run_id
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        tags={"role": role, "model": getattr(cfg.model, role).name, "recipe": cfg.train.recipe, **(tags or {})},
    )
    tree = cfg.model_dump(mode="json")
    params = {k: ("null" if v is None else str(v))[:500] for k, v in flatten(tree).items()}
    mlflow.log_params(params)
    mlflow.log_text(yaml.safe_dump(tree, sort_keys=False), "config.yaml")
    return run.info.run_id


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v == v}, step=epoch)


def log_phase(phase: str, epoch: int) -> None:
    """A recipe's phase from ``epoch`` (0-based) on: tag ``phase`` holds the current one, ``phase_<name>_from_epoch``
    where each began (a resumed run logs the phase it resumed in again, at the epoch it resumed at)."""
    mlflow.set_tags({"phase": phase, f"phase_{phase}_from_epoch": str(epoch)})
    log.info("training phase %s from epoch %d", phase, epoch)


def end_run() -> None:
    if mlflow.active_run() is not None:
        mlflow.end_run()


def publish_checkpoint(cfg: Config, run_id: str, checkpoint_dir: str | Path, role: str) -> str:
    """Log the best checkpoint to the run and register it as a new version of ``cxr-<role>``; returns the version."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = MlflowClient()
    client.log_artifacts(run_id, str(checkpoint_dir), artifact_path="checkpoint")
    name = f"cxr-{role}"
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=f"Chest X-ray {role.upper()}, one head per dataset")
    source = f"{client.get_run(run_id).info.artifact_uri}/checkpoint"
    version = client.create_model_version(name, source, run_id=run_id, tags={"checkpoint": str(checkpoint_dir)})
    return version.version
