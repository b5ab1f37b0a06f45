"""Connecting a stage to Ray: join the cluster a job was submitted to, or start a local one."""

from __future__ import annotations

import logging
import os

import ray

from pipelines.config import Config

log = logging.getLogger(__name__)


def ensure_ray(cfg: Config) -> None:
    """``ray.init`` once per process; under ``ray job submit`` RAY_ADDRESS points at the cluster."""
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False} if address is None else {}
    if address is None and cfg.cluster.num_cpus:
        kwargs["num_cpus"] = cfg.cluster.num_cpus
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING, **kwargs)
    log.info("ray: %s", ray.cluster_resources())
