"""`cxr serve` as people run it (its own local Ray, in a process of its own): while it serves, every socket that its
Ray listens on (GCS, raylet, dashboard and its agents, the Serve controller, proxy and each replica's gRPC server)
is on loopback. With ``cluster.loopback: false`` Ray's default (the machine's address, all interfaces) returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.helpers import ROOT, free_port, listening_beyond_loopback, png

pytestmark = [pytest.mark.ray, pytest.mark.slow]
START_TIMEOUT_S = 240


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C first (`cxr serve` shuts Serve down and its Ray ends with it), then the whole group if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):  # Ray's own processes of this group, if any outlived the command
        os.killpg(process.pid, signal.SIGKILL)


def test_cxr_serve_listens_on_loopback_only(tiny_checkpoints, tmp_path):
    port = free_port()
    sets = [
        f"serve.port={port}",
        f"train.run_dir={tmp_path / 'run'}",
        "serve.cache.enabled=false",
        "serve.router={num_cpus: 0.2}",
        "serve.cnn={min_replicas: 1, max_replicas: 1, num_cpus: 0.2, num_gpus: 0}",
        "serve.vit={min_replicas: 1, max_replicas: 1, num_cpus: 0.2, num_gpus: 0}",
    ]
    command = [sys.executable, "-m", "serve.cli", "--cnn", str(tiny_checkpoints["cnn"]),
               "--vit", str(tiny_checkpoints["vit"])]  # fmt: skip
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while "serving at" not in log.read_text():
            assert process.poll() is None, f"cxr serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"cxr serve not ready in {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        answer = requests.post(f"{url}/v1/predict?mode=ensemble", data=png(64), timeout=60)
        assert answer.status_code == 200, answer.text  # both replicas have served: their gRPC servers are up

        count, outside = listening_beyond_loopback(process.pid)
        assert count >= 10  # Serve's proxy, GCS, raylet, dashboard, agents, controller and three replicas
        assert not outside, f"cxr serve's Ray listens beyond loopback: {outside}"
    finally:
        _stop(process)
