"""The process behind `cxr cluster up`: a Ray head and worker nodes on this machine, every one bound to loopback.

``ray start`` cannot do this for worker nodes: it turns 127.0.0.1 into the machine's network address so that other
machines can reach the node, and Ray then listens on all interfaces. Ray's own multi-node simulator
(``ray.cluster_utils.Cluster``) starts each node with the address it is given, so here every node is 127.0.0.1
and nothing listens beyond loopback. Each worker node is a separate raylet with its own CPU count and its own
processes, so placement, node loss and recovery behave as on a real cluster.

Run by ``cluster.local`` in a session of its own, with token authentication in its environment; it writes the
cluster's state file once every node is up and shuts all nodes down on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

LOOPBACK = "127.0.0.1"


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.nodes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--head-cpus", type=float, default=2)
    parser.add_argument("--worker-cpus", default="1", help="one CPU count per worker node, comma-separated")
    parser.add_argument("--gcs-port", type=int, default=6380)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--object-store-mb", type=int, default=256)
    args = parser.parse_args(argv)
    if os.environ.get("RAY_AUTH_MODE") != "token" or not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        raise SystemExit("cluster.nodes runs with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH set (cxr cluster up)")

    from ray.cluster_utils import Cluster

    store = args.object_store_mb * 1024 * 1024
    worker_cpus = [float(c) for c in args.worker_cpus.split(",") if c][: args.workers]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": LOOPBACK,
            "gcs_server_port": args.gcs_port,
            "num_cpus": args.head_cpus,
            "object_store_memory": store,
            "include_dashboard": True,
            "dashboard_host": LOOPBACK,
            "dashboard_port": args.dashboard_port,
            # the agent that runs submitted jobs binds a free port (the workers' agents do too): Ray's fixed default,
            # 52365, is taken by any other Ray on the machine, and the job server then finds no agent
            "dashboard_agent_listen_port": 0,
            "node_name": "head",
        },
    )
    nodes = [{"name": "head", "num_cpus": args.head_cpus, "raylet_pid": raylet_pid(cluster.head_node)}]
    for index, cpus in enumerate(worker_cpus, start=1):
        name = f"worker-{index}"
        node = cluster.add_node(node_ip_address=LOOPBACK, num_cpus=cpus, object_store_memory=store, node_name=name)
        nodes.append({"name": name, "num_cpus": cpus, "raylet_pid": raylet_pid(node)})
    state = {
        "pid": os.getpid(),
        "gcs_address": cluster.gcs_address,
        "dashboard_url": f"http://{LOOPBACK}:{args.dashboard_port}",
        "token_path": os.environ["RAY_AUTH_TOKEN_PATH"],
        "nodes": nodes,
    }
    partial = args.state_file.with_suffix(".tmp")
    partial.write_text(json.dumps(state, indent=2))
    partial.replace(args.state_file)  # appears whole: `cxr cluster up` waits for it

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
