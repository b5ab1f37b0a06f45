"""`cxr cluster up|down|status`: a Ray cluster of several nodes on this machine that behaves like a real one.

``up`` starts a head (GCS, dashboard and job server on 127.0.0.1) and ``--workers`` extra worker nodes, each with
its own CPU count, in a background process (``cluster.nodes``) that outlives this command. Token authentication
is on: the token lives in ``<state_dir>/auth_token``, readable by its owner only, and every request to the
dashboard, the job server or Ray's RPCs must carry it. Nothing listens beyond loopback.

Stages then run as jobs: ``cxr <stage> --address http://127.0.0.1:8265 ...`` or ``ray job submit``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from models.errors import CxrError
from pipelines.cli import run_module
from pipelines.config import Config

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
UP_TIMEOUT_S = 180.0


class ClusterError(CxrError, RuntimeError):
    pass


def state_dir(cfg: Config) -> Path:
    return cfg.cluster.local.state_dir.resolve()


def read_state(folder: Path) -> dict | None:
    """The running cluster's state, or None when none is running (a stale file from a dead one is removed)."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if not _alive(state["pid"]):
        path.unlink()
        return None
    return state


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # not our child: the usual case (`cxr cluster up` has exited)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our child that has exited (a test's cluster): reaped, not alive
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_token(folder: Path) -> Path:
    """The cluster's token file: created once, owner-only (directory 700, file 600), reused by later clusters."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    token = folder / TOKEN_FILE
    if not token.is_file():
        descriptor = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    token.chmod(0o600)
    return token


def auth_env(token: Path) -> dict[str, str]:
    """What a client (or a node) needs in its environment to talk to this cluster."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def parse_worker_cpus(text: str, workers: int) -> list[float]:
    values = [float(part) for part in str(text).split(",") if part.strip()]
    if len(values) == 1:
        return values * workers
    if len(values) != workers:
        raise ClusterError(f"--worker-cpus has {len(values)} values for {workers} workers: give one, or one each")
    return values


def up(cfg: Config, workers: int, worker_cpus: list[float], dashboard_port: int) -> dict:
    folder = state_dir(cfg)
    if (running := read_state(folder)) is not None:
        raise ClusterError(f"a cluster is already running (pid {running['pid']}): `cxr cluster down` first")
    token = ensure_token(folder)
    local = cfg.cluster.local
    env = {
        **os.environ,
        **auth_env(token),
        # Keep every node on 127.0.0.1: Ray otherwise swaps loopback for the machine's network address so other
        # machines can join, and then listens on all interfaces. One machine needs no other address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Job entrypoints (`python -m ...`) run with the cluster's PATH: this Python and its installed project.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    command = [
        sys.executable, "-m", "cluster.nodes",
        "--state-file", str(folder / STATE_FILE),
        "--workers", str(workers),
        "--head-cpus", str(local.head_cpus),
        "--worker-cpus", ",".join(str(c) for c in worker_cpus),
        "--gcs-port", str(local.gcs_port),
        "--dashboard-port", str(dashboard_port),
        "--object-store-mb", str(local.object_store_mb),
    ]  # fmt: skip
    log_path = folder / "nodes.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        if (state := read_state(folder)) is not None:
            return state
        if process.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise ClusterError(f"the nodes' process exited with {process.returncode}; {log_path}:\n{tail}")
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise ClusterError(f"the cluster did not come up within {UP_TIMEOUT_S:.0f}s; see {log_path}")


def down(cfg: Config, timeout_s: float = 60.0) -> bool:
    """Stop the cluster's nodes (and the jobs and Serve apps on them); False if none was running."""
    folder = state_dir(cfg)
    state = read_state(folder)
    if state is None:
        return False
    pid = state["pid"]
    os.kill(pid, signal.SIGTERM)  # the nodes' process shuts every node down
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # anything left in its session: a node that would not stop
    (folder / STATE_FILE).unlink(missing_ok=True)
    return True


def status(cfg: Config) -> tuple[dict | None, list[dict]]:
    """The state and the nodes as Ray's GCS sees them (alive or dead, CPUs)."""
    state = read_state(state_dir(cfg))
    if state is None:
        return None, []
    os.environ.update(auth_env(Path(state["token_path"])))
    from ray.util.state import list_nodes

    nodes = list_nodes(address=state["dashboard_url"], detail=True, raise_on_missing_output=False)
    return state, [
        {"name": n.node_name, "state": n.state, "cpus": n.resources_total.get("CPU"), "head": n.is_head_node}
        for n in nodes
    ]


def print_connect_help(state: dict) -> None:
    url = state["dashboard_url"]
    print(f"dashboard and job server: {url}  (the page asks for the token in {state['token_path']})")
    print(f"clients: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={state['token_path']}")
    print(f"run a stage as a job: cxr train --profile demo --model cnn --address {url}")
    print(f"           or: ray job submit --address {url} --working-dir . -- python -m pipelines.train.driver ...")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cxr cluster up` (down and status take only the shared ones)."""
    parser.add_argument("--workers", type=int, default=0, help="extra worker nodes beside the head (default 0)")
    parser.add_argument(
        "--worker-cpus", default=None, help="CPUs per worker node, one value or one per worker (e.g. 1,2)"
    )


def run_up(args: argparse.Namespace, cfg: Config) -> int:
    cpus = parse_worker_cpus(args.worker_cpus or str(cfg.cluster.local.worker_cpus), args.workers)
    state = up(cfg, args.workers, cpus, cfg.cluster.dashboard_port)
    names = ", ".join(f"{n['name']} ({n['num_cpus']:g} CPU)" for n in state["nodes"])
    print(f"cluster up: {names}; GCS {state['gcs_address']}")
    print_connect_help(state)
    return 0


def run_down(args: argparse.Namespace, cfg: Config) -> int:
    print("cluster stopped" if down(cfg) else "no cluster running")
    return 0


def run_status(args: argparse.Namespace, cfg: Config) -> int:
    state, nodes = status(cfg)
    if state is None:
        print("no cluster running")
        return 1
    print(f"cluster pid {state['pid']}, GCS {state['gcs_address']}")
    for node in nodes:
        role = "head" if node["head"] else "worker"
        print(f"  {node['name']:<10} {role:<7} {node['state']:<6} {node['cpus'] or 0:g} CPU")
    print_connect_help(state)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`cxr cluster up|down|status`; also `python -m cluster.local up|down|status` (what a Ray job runs)."""
    return run_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
