"""Building the Serve application: ``build_app(cfg) -> Application``, and ``app_builder(args)`` for Serve config files.

Composition: ``EnsembleRouter.bind(CNNModel.bind(...), ViTModel.bind(...), options)``; each model deployment gets
its autoscaling, queue limits, batching and resources from ``serve.<role>``, the router from ``serve.router``. The
gate's weights and threshold come from ``ensemble.yaml`` (tune stage B) or the config's ``ensemble:`` section and
travel as the router's ``user_config``, so ``serve deploy`` with new values changes them live.

Nothing here loads weights or talks to MLflow: building only reads ``latest-<role>.json`` / ``ensemble.yaml``
and the out-of-distribution check's file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.serve import Application

from pipelines.artifacts import load_settings
from pipelines.config import Config, DeploymentConfig, load_config
from serve.model_source import resolve_source
from serve.replicas import CNNModel, ViTModel, torch_threads
from serve.router import EnsembleRouter

GPU_SHARE_AUTO = 0.5  # "auto" on a GPU cluster: the two models share one GPU


def _num_gpus(setting: str | float) -> float:
    if setting != "auto":
        return float(setting)
    import ray

    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return GPU_SHARE_AUTO if has_gpu else 0.0


PROXY_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"  # read by each Serve proxy at start (Ray 2.60)


def use_grpc_in_local_proxies(cfg: Config) -> None:
    """``serve.grpc`` for the proxies of a Ray this process is about to start: Serve reads the switch from the
    proxy's environment, which a local Ray's processes inherit from here. A joined cluster's proxies keep the
    cluster's setting (set the variable there); the router's own calls follow ``serve.grpc`` everywhere."""
    import ray

    if cfg.serve.grpc and not (ray.is_initialized() or cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault(PROXY_GRPC_ENV, "1")


def serve_logging(access_log: bool = False, verbose: bool = False) -> dict[str, Any]:
    """A Serve ``logging_config`` (deployments; controller and proxies through ``serve.start``): Serve's routine INFO
    lines (replicas added and started, endpoints updated, long-poll clients) off the console and the Serve log files,
    its warnings and errors kept. With the access log on, INFO stays, since that is the level of the access lines."""
    return {"enable_access_log": access_log, "log_level": "INFO" if access_log or verbose else "WARNING"}


def deployment_options(deployment: DeploymentConfig, access_log: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``Deployment.options`` for one model deployment."""
    return {
        "logging_config": serve_logging(access_log),
        "autoscaling_config": {
            "min_replicas": deployment.min_replicas,
            "initial_replicas": deployment.initial_replicas,
            "max_replicas": deployment.max_replicas,
            "target_ongoing_requests": deployment.target_ongoing_requests,
        },
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "max_queued_requests": deployment.max_queued_requests,
        "ray_actor_options": {"num_cpus": deployment.num_cpus, "num_gpus": _num_gpus(deployment.num_gpus)},
    }


def gate_user_config(cfg: Config, ensemble_path: str | Path | None = None) -> dict[str, Any]:
    settings = load_settings(cfg, ensemble_path)
    return {
        "w_cnn": settings.w_cnn,
        "threshold": settings.threshold,
        "finding_threshold": cfg.serve.finding_threshold,
        "finding_thresholds": dict(cfg.serve.finding_thresholds),
        "source": settings.source,
        "tuned_for": settings.tuned_for,
        "temperatures": settings.temperatures,
        "refer_below": settings.refer_below,
    }


def ood_detector(cfg: Config, ensemble_path: str | Path | None = None) -> dict[str, Any] | None:
    """Stage B's out-of-distribution check as the router takes it, or None when ensemble.yaml has none."""
    detector = load_settings(cfg, ensemble_path).ood_detector()
    return None if detector is None else detector.to_dict()


def build_app(
    cfg: Config,
    cnn_checkpoint: str | Path | None = None,
    vit_checkpoint: str | Path | None = None,
    ensemble_path: str | Path | None = None,
    api_key: str | None = None,
) -> Application:
    """The application ``serve.run`` deploys. ``api_key`` (tests, or a driver that has the key) is handed to the
    router through its runtime environment; otherwise the router reads ``serve.api_key_env`` from its own."""
    cfg = cfg.with_absolute_paths()
    models = {}
    for role, deployment, checkpoint in (("cnn", CNNModel, cnn_checkpoint), ("vit", ViTModel, vit_checkpoint)):
        settings = getattr(cfg.serve, role)
        models[role] = deployment.options(**deployment_options(settings, cfg.serve.access_log)).bind(
            resolve_source(cfg, role, checkpoint),
            settings.batch_max_size,
            settings.batch_wait_timeout_s,
            torch_threads(settings.num_cpus),
        )
    router = cfg.serve.router
    actor_options: dict[str, Any] = {"num_cpus": router.num_cpus}
    if api_key is not None:
        if not cfg.serve.api_key_env:
            raise ValueError("an api_key was given but serve.api_key_env is not set")
        actor_options["runtime_env"] = {"env_vars": {cfg.serve.api_key_env: api_key}}
    options = {
        "request_timeout_s": cfg.serve.request_timeout_s,
        "max_upload_mb": cfg.serve.max_upload_mb,
        "max_pixels": cfg.serve.max_pixels,
        "max_batch_images": cfg.serve.max_batch_images,
        "dicom_modalities": list(cfg.serve.dicom_modalities),
        "api_key_env": cfg.serve.api_key_env,
        "grpc": cfg.serve.grpc,
        "gate": gate_user_config(cfg, ensemble_path),
        "ood": ood_detector(cfg, ensemble_path),  # arrays of stage B's check, bound at deploy (not live-reconfigured)
        "ood_enabled": cfg.ood.enabled,
        "cache": cfg.serve.cache.model_dump(mode="json"),  # the result cache (serve/cache.py)
    }
    return EnsembleRouter.options(
        num_replicas=router.num_replicas,
        max_ongoing_requests=router.max_ongoing_requests,
        max_queued_requests=router.max_queued_requests,
        ray_actor_options=actor_options,
        user_config=options["gate"],
        logging_config=serve_logging(cfg.serve.access_log),
    ).bind(models["cnn"], models["vit"], options)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point of ``serve/serve_config.yaml`` (``import_path: serve.app:app_builder``).

    ``args``: ``config`` (default ray_config.yaml), ``profile``, ``sets`` (list of dotted.key=value), ``cnn`` /
    ``vit`` (checkpoint dirs), ``ensemble`` (an ensemble.yaml). Relative paths are taken from the working directory.
    The API key, if any, is read by the router from its own environment (set it on the cluster, not in the file).
    """
    known = {"config", "profile", "sets", "cnn", "vit", "ensemble"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown app args {unknown}; known: {sorted(known)}")
    cfg = load_config(args.get("config", "ray_config.yaml"), args.get("profile"), list(args.get("sets") or []))
    return build_app(cfg, args.get("cnn"), args.get("vit"), args.get("ensemble"))
