"""Connecting a stage to Ray: join the cluster a job was submitted to, or start a local one."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import ray

from pipelines.config import Config

log = logging.getLogger(__name__)


WORKER_SETUP_HOOK = "pipelines.runtime.prepare_worker"
VERBOSE_ENV = "CXR_RAY_VERBOSE"  # "1" in a worker's environment: `cxr <stage> -v`, keep Ray's routine lines

# Ray's routine lines, by the logger that writes them; a level of WARNING keeps that logger's warnings and errors.
# Children of "ray.data" and "ray.serve" (not those two: Ray Data and Serve reset them whenever they configure
# their logging) keep the level set here in the driver and, through the setup hook, in every worker.
RAY_CHATTER = {
    # every Dataset pass: "Starting execution", "Execution plan", "execution finished in", progress lines,
    # parquet size estimates (Ray Data's own log files under the session's logs/ray-data keep its DEBUG lines)
    "ray.data._internal": logging.WARNING,
    "ray.data.dataset": logging.WARNING,  # "Data sink Parquet finished. N rows written"
    # "Progress bars disabled. To enable, set ...": a WARNING about a setting we chose (configure_data_context)
    "ray.data._internal.progress": logging.ERROR,
    "ray.train": logging.WARNING,  # Ray Train's per-report line: the whole metrics dict of every rank, every epoch
    # "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out": a local
    # ray.init turns token auth on and says so at every stage start. Setting RAY_AUTH_MODE=token instead does not
    # work once ray is imported (Ray caches its config at import; the driver would then lack the token), and ray.init
    # never logs the "disabled" warning, so this logger has nothing else to say there.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}
# Warnings Ray raises about its own calls (not ours), once per worker that imports the module.
RAY_INTERNAL_WARNINGS = (
    # Ray Train's DataConfig copies ExecutionOptions.exclude_resources into every DatasetManager
    r"`ExecutionOptions\.exclude_resources` is deprecated",
)
# Environment of a Ray started here, set before ray.init so every Ray process inherits it (a value the user has
# already set wins).
LOCAL_RAY_ENV = {
    # Ray Train watches for node preemption (cloud spot nodes); on one local machine there is none to watch, and
    # its watcher actor logs a core-worker error line at every training start (ray-project/ray#53727).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


LOOPBACK = "127.0.0.1"


def keep_ray_on_loopback() -> str:
    """Make the local Ray this process starts listen on 127.0.0.1 only, and return that address for ``ray.init``.

    On Linux Ray names a node by the machine's network address so that other machines can join it, and the GCS,
    raylet, agents and every worker's gRPC server then listen on all interfaces. Ray reads the switch that keeps a
    node on loopback (its macOS and Windows default) once, at import: it is set here in this process's copy and in
    the environment that the Ray processes started next inherit.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    return LOOPBACK


def bind_serve_replicas_to_loopback() -> None:
    """Serve replicas open their inter-deployment gRPC server on ``[::]:0`` whatever the node's address (Ray 2.60,
    ``serve/_private/replica.py``); on a loopback node that is the one port still open to the network. Callers
    reach it at the node's address, so binding it to 127.0.0.1 changes nothing else. Patched where the replica
    module takes the function from, before that module is imported in this worker."""
    from ray._common import tls_utils

    bind = tls_utils.add_port_to_grpc_server
    if getattr(bind, "cxr_loopback", False):
        return

    def on_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = f"{LOOPBACK}:{address.removeprefix('[::]:')}"
        return bind(server, address)

    on_loopback.cxr_loopback = True
    tls_utils.add_port_to_grpc_server = on_loopback


def quiet_ray_loggers() -> None:
    """Ray's routine INFO lines off the console; its warnings and errors, and all of our lines, stay."""
    for name, level in RAY_CHATTER.items():
        logging.getLogger(name).setLevel(level)
    for message in RAY_INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def prepare_worker() -> None:
    """Runs in every worker process of a stage (``worker_process_setup_hook``): Serve replicas kept on loopback where
    the node is, and the driver's quiet loggers there too (Ray would forward the chatter of its SplitCoordinator,
    DatasetManager and Train workers to the console)."""
    from ray._private import ray_constants

    if os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR) == "0":
        bind_serve_replicas_to_loopback()
    if os.environ.get(VERBOSE_ENV) != "1":
        quiet_worker_logs()


def quiet_worker_logs() -> None:
    quiet_ray_loggers()
    try:  # Train V2 logs its per-report lines under the module's file path, not a dotted name
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def ensure_ray(cfg: Config) -> None:
    """``ray.init`` once per process; under ``ray job submit`` RAY_ADDRESS points at the cluster.

    Without ``cluster.address`` or RAY_ADDRESS a stage starts a Ray of its own (``address="local"``) rather than
    joining whatever Ray happens to run on the machine (``ray.init()`` alone joins the one ``ray start`` or a test's
    cluster last registered): ``cluster.address: auto`` joins a running one on purpose.

    A local Ray started here listens on loopback only (``cluster.loopback``) and gets the dashboard on
    ``cluster.dashboard_host``: people watch jobs and Train runs there, and Ray's state API behind it is what Train
    uses to clean up after itself.
    """
    if ray.is_initialized():
        return
    quiet = not logging.getLogger("ray").isEnabledFor(logging.DEBUG)  # `cxr <stage> -v` keeps Ray's lines too
    if quiet:
        quiet_ray_loggers()
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    local = address is None
    kwargs: dict = {}
    if local:
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
        # no fixed port: a second stage running beside this one takes the next free port instead of failing
        kwargs = {"include_dashboard": True, "dashboard_host": cfg.cluster.dashboard_host}
        address = "local"
        if cfg.cluster.num_cpus:
            kwargs["num_cpus"] = cfg.cluster.num_cpus
        if cfg.cluster.loopback:
            kwargs["_node_ip_address"] = keep_ray_on_loopback()
    context = ray.init(
        address=address,
        log_to_driver=True,
        logging_level=logging.WARNING,
        runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK, "env_vars": {} if quiet else {VERBOSE_ENV: "1"}},
        **kwargs,
    )
    log.info("ray: %s; dashboard: %s", ray.cluster_resources(), context.dashboard_url or "none")
    token = Path.home() / ".ray" / "auth_token"  # a local Ray turns token auth on and writes this with the umask
    if local and token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)
