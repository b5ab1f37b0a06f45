"""`cxr train --model cnn|vit`: DDP training on Ray Train, streaming the shards with Ray Data.

Running the same ``--run-name`` again continues from the run's last checkpoint. Run it as ``cxr train`` or
``python -m pipelines.train.driver`` (e.g. under ``ray job submit``). A linear probe (``train.recipe=linear_probe``)
is recorded as its own variant: run ``<role>-probe-<arch>`` by default, ``latest-<role>-probe.json``, registered
model ``cxr-<role>-probe``; ``latest-<role>.json`` stays the model trained end to end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.artifacts import training_key, write_latest_training
from pipelines.cli import run_module
from pipelines.config import Config, apply_override, config_from_dict
from pipelines.data.shards import load_manifest
from pipelines.data.streaming import preprocessed_split
from pipelines.runtime import ensure_ray
from pipelines.train import tracking
from pipelines.train.loop import train_loop_per_worker
from pipelines.train.recipes import check_recipe

log = logging.getLogger(__name__)
ROLES = ("cnn", "vit")


def resolve_use_gpu(setting: str | bool) -> bool:
    """``auto``: GPUs when the cluster has any."""
    return bool(ray.cluster_resources().get("GPU", 0)) if setting == "auto" else bool(setting)


def _dataset_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """What workers need from the ingest manifest, as a small plain dict."""
    return {
        "label_spaces": manifest["label_spaces"],  # the heads, in order (LabelSpace.to_dict each)
        "positive_weights": manifest["positive_weights"],  # per multi-label head, per class
        "train_rows": sum(per_split["train"] for per_split in manifest["images"].values()),
    }


def for_role(cfg: Config, role: str) -> Config:
    """The config a run of ``role`` trains with: ``model.<role>.epochs``, when set, replaces ``train.epochs``."""
    epochs = getattr(cfg.model, role).epochs
    if epochs is None:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})


def validation_split(cfg: Config) -> ray.data.Dataset:
    """The validation split, decoded once and kept in the object store with ``train.cache_val``: every epoch
    then reads the same blocks instead of decoding and resizing the split again."""
    ds = preprocessed_split(cfg, "val")
    return ds.materialize() if cfg.train.cache_val else ds


def build_trainer(
    cfg: Config,
    role: str,
    run_name: str,
    callbacks: list | None = None,
    mlflow_tags: dict[str, str] | None = None,
) -> TorchTrainer:
    """``callbacks`` go to Ray Train (a sweep passes TuneReportCallback); ``mlflow_tags`` to the run's MLflow run
    (a sweep links each trial to its parent run)."""
    cfg = for_role(cfg, role)
    check_recipe(cfg, role)
    manifest = load_manifest(cfg.data.shards_dir)
    use_gpu = resolve_use_gpu(cfg.train.use_gpu)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "role": role,
            "run_name": run_name,
            "info": _dataset_info(manifest),
            "mlflow_tags": mlflow_tags or {},
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(cfg.train.run_dir).resolve()),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's per-report lines; ours stay
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute="val_score",
                checkpoint_score_order="max",
            ),
        ),
        datasets={"train": preprocessed_split(cfg, "train"), "val": validation_split(cfg)},
    )


def train(cfg: Config, role: str, run_name: str | None = None) -> dict[str, Any]:
    """Fit one model; returns a summary with the best checkpoint, its metrics and the MLflow run/version."""
    if role not in ROLES:
        raise ValueError(f"--model must be one of {ROLES}, got {role!r}")
    key = training_key(role, cfg.train.recipe)  # cnn, or cnn-probe: a probe never replaces latest-cnn.json
    run_name = run_name or f"{key}-{getattr(cfg.model, role).name}"
    check_recipe(for_role(cfg, role), role)  # before Ray starts (build_trainer checks again, for sweeps)
    cfg = cfg.with_absolute_paths()
    tracking.ensure_experiment(cfg)
    cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": tracking.tracking_uri(cfg)})})
    ensure_ray(cfg)
    result = build_trainer(cfg, role, run_name).fit()
    if result.error:
        raise result.error
    best, best_metrics = max(result.best_checkpoints, key=lambda pair: pair[1]["val_score"])
    final = result.metrics
    run_id = final["mlflow_run_id"]
    version = tracking.publish_checkpoint(cfg, run_id, best.path, key)
    summary = {
        "role": role,
        "recipe": cfg.train.recipe,
        "run_name": run_name,
        "run_dir": str(Path(result.path)),
        "best_checkpoint": best.path,
        "best_epoch": best_metrics["epoch"],
        "best_metrics": {k: best_metrics[k] for k in best_metrics if k.startswith("val_")},
        "epochs_run": final["epoch"] + 1,
        "resumed_from_epoch": final["resumed_from_epoch"],
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": tracking.tracking_uri(cfg),
        "registered_model": f"cxr-{key}/{version}",
    }
    write_latest_training(cfg, key, summary)
    return summary


def config_with_tune_result(cfg: Config, path: Path) -> Config:
    """Apply the ``best_config`` overrides a tune sweep wrote (dotted keys -> values)."""
    found = yaml.safe_load(path.read_text()) or {}
    tree = cfg.model_dump(mode="json")
    for key, value in (found.get("best_config") or {}).items():
        tree = apply_override(tree, f"{key}={json.dumps(value)}")
    return config_from_dict(tree, str(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=ROLES, required=True, help="which network to train")
    parser.add_argument(
        "--run-name",
        help="run name under train.run_dir (default: <model>-<arch>, <model>-probe-<arch> for a linear probe); "
        "reuse to resume",
    )
    parser.add_argument("--from-tune", type=Path, help="best-config YAML written by `cxr tune train`")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.from_tune:
        cfg = config_with_tune_result(cfg, args.from_tune)
    summary = train(cfg, args.model, args.run_name)
    metrics = "  ".join(f"{k[4:]} {v:.3f}" for k, v in summary["best_metrics"].items())
    print(f"best epoch {summary['best_epoch'] + 1} of {summary['epochs_run']}: {metrics}")
    print(f"checkpoint: {summary['best_checkpoint']}")
    print(
        f"MLflow run {summary['mlflow_run_id']} ({summary['registered_model']}); UI: "
        f"mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr train`; also `python -m pipelines.train.driver` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
