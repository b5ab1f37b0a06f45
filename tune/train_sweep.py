"""`cxr tune train --model cnn|vit` (stage A): Ray Tune over the training hyperparameters.

Each trial is a small driver function that builds and fits a `TorchTrainer` (Ray Train V2's way to tune; the
old ``Tuner(trainer)`` is deprecated), forwarding every epoch's validation metrics to Tune through
``TuneReportCallback``; ASHA stops the weak trials early. The sweep is one MLflow parent run with a nested run per
trial. At the end: a results table, and ``<sweep>-best.yaml`` that ``cxr train --from-tune`` accepts. Running the
same sweep name again resumes it: finished trials are kept, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipelines.cli import run_module
from pipelines.config import Config, apply_override, config_from_dict
from pipelines.runtime import ensure_ray
from pipelines.train import tracking
from pipelines.train.driver import ROLES, build_trainer, for_role, resolve_use_gpu

log = logging.getLogger(__name__)
METRIC = "val_score"
DRIVER_MEMORY_BYTES = 256 * 1024**2


def search_space(cfg: Config, role: str) -> dict[str, Any]:
    """Dotted config keys -> Tune domains; a list with one value is held fixed."""
    space: dict[str, Any] = {"train.lr": tune.loguniform(cfg.tune.lr_min, cfg.tune.lr_max)}
    for key, values in (("train.weight_decay", cfg.tune.weight_decay), (f"model.{role}.drop_rate", cfg.tune.drop_rate)):
        if len(values) > 1:
            space[key] = tune.choice(list(values))
        elif values:
            space[key] = values[0]
    return space


def with_params(cfg: Config, params: dict[str, Any]) -> Config:
    tree = cfg.model_dump(mode="json")
    for key, value in params.items():
        tree = apply_override(tree, f"{key}={json.dumps(value)}")
    return config_from_dict(tree, "tune trial")


def max_concurrent_trials(cfg: Config) -> int:
    """As many trials as the cluster can train at once: each needs its workers' CPUs (GPUs) plus one CPU for Ray
    Data's reading and preprocessing; Train runs that cannot get all their workers only wait."""
    resources = ray.cluster_resources()
    per_trial_cpus = cfg.train.num_workers * cfg.train.cpus_per_worker + 1
    limit = int(resources.get("CPU", 0) // per_trial_cpus)
    if resolve_use_gpu(cfg.train.use_gpu):
        limit = min(limit, int(resources.get("GPU", 0) // cfg.train.num_workers))
    return max(1, limit)


def train_driver(params: dict[str, Any], base: dict[str, Any], role: str, sweep: str, parent_run_id: str) -> None:
    """One trial: the Train run is named after the trial, so a restored trial continues its own checkpoints."""
    trial_id = tune.get_context().get_trial_id()
    cfg = with_params(config_from_dict(base, "tune sweep"), params)
    trainer = build_trainer(
        cfg,
        role,
        f"{sweep}-{trial_id}",
        callbacks=[TuneReportCallback()],
        mlflow_tags={"mlflow.parentRunId": parent_run_id, "sweep": sweep, "trial": trial_id},
    )
    result = trainer.fit()
    if result.error:
        raise result.error


def _parent_run(cfg: Config, sweep: str, role: str, marker: Path, space: dict[str, Any]) -> str:
    """The sweep's MLflow run, reused when the sweep is resumed."""
    if marker.is_file():
        return marker.read_text().strip()
    experiment = tracking.ensure_experiment(cfg)
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    run = client.create_run(experiment, run_name=sweep, tags={"stage": "tune-train", "role": role, "sweep": sweep})
    for key, domain in space.items():
        client.log_param(run.info.run_id, f"space.{key}", str(domain))
    client.log_param(run.info.run_id, "num_samples", cfg.tune.num_samples)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


def results_table(grid: tune.ResultGrid, keys: list[str]) -> pd.DataFrame:
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        scores = history[METRIC] if history is not None and METRIC in history else pd.Series(dtype=float)
        params = result.config or {}
        rows.append(
            {
                "trial": (result.metrics or {}).get("trial_id", "?"),
                **{key: params.get(key) for key in keys},
                METRIC: float(scores.max()) if len(scores) else math.nan,
                "epochs": int(len(scores)),
                "checkpoint": (result.metrics or {}).get("checkpoint_path"),
                "error": type(result.error).__name__ if result.error else "",
            }
        )
    return pd.DataFrame(rows).sort_values(METRIC, ascending=False, na_position="last").reset_index(drop=True)


def tune_training(cfg: Config, role: str, sweep: str | None = None) -> dict[str, Any]:
    if role not in ROLES:
        raise ValueError(f"--model must be one of {ROLES}, got {role!r}")
    sweep = sweep or f"tune-{role}"
    cfg = for_role(cfg.with_absolute_paths(), role)
    cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": tracking.tracking_uri(cfg)})})
    storage = Path(cfg.train.run_dir) / "tune"
    # the trials' own Train runs (checkpoints) live under the sweep, not beside regular training runs
    trial_runs = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"run_dir": str(storage / f"{sweep}-trials")})}
    )
    ensure_ray(cfg)
    space = search_space(cfg, role)
    parent = _parent_run(cfg, sweep, role, storage / f"{sweep}.mlflow-run", space)
    trainable = tune.with_parameters(
        train_driver, base=trial_runs.model_dump(mode="json"), role=role, sweep=sweep, parent_run_id=parent
    )
    # the trial function only drives Train: its workers hold the CPUs (and GPUs), and Ray Data's tasks need whole
    # CPUs, so the driver asks for memory alone (Tune refuses an empty request)
    trainable = tune.with_resources(trainable, {"memory": DRIVER_MEMORY_BYTES})
    path = storage / sweep
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming sweep %s from %s", sweep, path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=max_concurrent_trials(cfg),
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=cfg.train.epochs,
                    grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                    reduction_factor=2,
                ),
            ),
            run_config=tune.RunConfig(name=sweep, storage_path=str(storage), verbose=1),
        )
    grid = tuner.fit()
    keys = [key for key, value in space.items() if isinstance(value, tune.search.sample.Domain)]
    table = results_table(grid, keys)
    best = table.iloc[0]
    best_file = storage / f"{sweep}-best.yaml"
    body = {
        "sweep": sweep,
        "role": role,
        "metric": METRIC,
        "best_trial": best["trial"],
        "best_score": float(best[METRIC]),
        "best_checkpoint": best["checkpoint"],
        "best_config": {key: _plain(best[key]) for key in keys},
        "mlflow_parent_run_id": parent,
    }
    best_file.write_text(yaml.safe_dump(body, sort_keys=False))
    _log_sweep(cfg, parent, table, best_file)
    return {"table": table, "best_file": best_file, "best": body, "path": path, "parent_run_id": parent}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _log_sweep(cfg: Config, parent: str, table: pd.DataFrame, best_file: Path) -> None:
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    if not math.isnan(float(table.iloc[0][METRIC])):
        client.log_metric(parent, f"best_{METRIC}", float(table.iloc[0][METRIC]))
    client.log_metric(parent, "trials", len(table))
    client.log_text(parent, table.to_csv(index=False), "results.csv")
    client.log_artifact(parent, str(best_file))
    client.set_terminated(parent)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=ROLES, required=True, help="which network to tune")
    parser.add_argument("--name", help="sweep name under <train.run_dir>/tune (default: tune-<model>); reuse to resume")


def run(args: argparse.Namespace, cfg: Config) -> int:
    result = tune_training(cfg, args.model, args.name)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(result["table"].drop(columns=["checkpoint"]).to_string(index=False))
    print(f"\nbest: trial {result['best']['best_trial']}  {METRIC} {result['best']['best_score']:.4f}")
    print(f"best config: {result['best_file']}  (cxr train --model {args.model} --from-tune {result['best_file']})")
    print(f"sweep: {result['path']}  MLflow parent run: {result['parent_run_id']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr tune train`; also `python -m tune.train_sweep` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
