"""Connecting a stage to Ray: join the cluster a job was submitted to, or start a local one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from pipelines.config import Config

log = logging.getLogger(__name__)


QUIET_WORKERS_HOOK = "pipelines.runtime.quiet_worker_logs"


def quiet_worker_logs() -> None:
    """Runs in every worker process: drop Ray Train's per-report INFO line (it prints the whole metrics dict
    of every rank every epoch), so the console shows our one line per epoch."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Train V2 logs those lines under the module's file path, not a dotted name
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def ensure_ray(cfg: Config) -> None:
    """``ray.init`` once per process; under ``ray job submit`` RAY_ADDRESS points at the cluster.

    A local Ray started here gets the dashboard on ``cluster.dashboard_host`` (loopback by default): people
    watch jobs and Train runs there, and Ray's state API behind it is what Train uses to clean up after itself.
    """
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {}
    if address is None:
        # no fixed port: a second stage running beside this one takes the next free port instead of failing
        kwargs = {"include_dashboard": True, "dashboard_host": cfg.cluster.dashboard_host}
        if cfg.cluster.num_cpus:
            kwargs["num_cpus"] = cfg.cluster.num_cpus
    context = ray.init(
        address=address,
        log_to_driver=True,
        logging_level=logging.WARNING,
        runtime_env={"worker_process_setup_hook": QUIET_WORKERS_HOOK},
        **kwargs,
    )
    log.info("ray: %s; dashboard: %s", ray.cluster_resources(), context.dashboard_url or "none")
    token = Path.home() / ".ray" / "auth_token"  # a local Ray turns token auth on and writes this with the umask
    if address is None and token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)
