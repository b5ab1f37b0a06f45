"""A local multi-node cluster (`cxr cluster up`: a head and a worker node, token auth) used as people use a real one.

Stages run as jobs submitted through ``JobSubmissionClient`` (synth and ingest, a tiny CNN and ViT training, tune
stage B), the Serve app is deployed by a job and answers over HTTP, the worker node is killed in the middle of a
training job and the run finishes from its last checkpoint, a job without the token is refused, and every port
the cluster opens is on loopback.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from mlflow.tracking import MlflowClient

from cluster import local
from cluster.submit import EXCLUDES
from pipelines.config import load_config
from tests.helpers import ROOT, free_port, listening_beyond_loopback

pytestmark = [pytest.mark.ray, pytest.mark.slow]
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster-state")
    cfg = load_config(
        ROOT / "ray_config.yaml",
        None,
        [
            f"cluster.local.state_dir={state_dir}",
            f"cluster.local.gcs_port={free_port()}",
            f"cluster.dashboard_port={free_port()}",
        ],
    )
    state = local.up(cfg, workers=1, worker_cpus=[1.0], dashboard_port=cfg.cluster.dashboard_port)
    yield cfg, state
    local.down(cfg)


@pytest.fixture(scope="module")
def jobs(cluster):
    from ray.job_submission import JobSubmissionClient

    _, state = cluster
    token = Path(state["token_path"]).read_text()
    return JobSubmissionClient(state["dashboard_url"], headers={"Authorization": f"Bearer {token}"})


def _run(jobs, *args: str) -> str:
    """Submit ``python <args>`` with this checkout as the working directory; wait for SUCCEEDED."""
    from ray.job_submission import JobStatus

    job_id = jobs.submit_job(
        entrypoint=shlex.join(["python", *args]), runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES}
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (status := jobs.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, f"{args[:2]} ended {status}:\n{jobs.get_job_logs(job_id)[-4000:]}"
    return job_id


def _sets(root: Path, *extra: str) -> list[str]:
    values = [
        f"data.nih_dir={root / 'data' / 'nih'}",
        f"data.covid_dir={root / 'data' / 'covid'}",
        f"data.shards_dir={root / 'shards'}",
        f"train.run_dir={root / 'train'}",
        "data.synth.nih_patients=40",
        "data.synth.nih_image_size=64",
        "data.synth.covid_images=64",
        "data.synth.covid_image_size=64",
        "data.storage_size=32",
        "data.rows_per_shard=64",
        "model.input_size=32",
        "train.batch_size=8",
        "train.epochs=1",
        "model.vit.epochs=null",
        *extra,
    ]
    return [arg for value in values for arg in ("--set", value)]


def _train(jobs, root: Path, role: str, run_name: str, *extra: str) -> str:
    args = ["-m", "pipelines.train.driver", "--profile", "demo", "--model", role, "--run-name", run_name]
    return _run(jobs, *args, *_sets(root, *extra))


@pytest.fixture(scope="module")
def shards(jobs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-run")
    _run(jobs, "-m", "pipelines.data.synth", "--profile", "demo", *_sets(root))
    _run(jobs, "-m", "pipelines.data.ingest", "--profile", "demo", *_sets(root))
    assert list((root / "shards").rglob("*.parquet"))
    return root


def test_a_job_without_the_token_is_refused(cluster, jobs, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    _, state = cluster
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(Path(state["token_path"]).parent / "no-home"))  # no ~/.ray/auth_token either
    answer = requests.post(f"{state['dashboard_url']}/api/jobs/", json={"entrypoint": "echo hi"}, timeout=30)
    assert answer.status_code == 401
    with pytest.raises(Exception, match="(?i)auth|401|unauthori"):
        JobSubmissionClient(state["dashboard_url"]).submit_job(entrypoint="echo should-not-run")
    with pytest.raises(Exception, match="(?i)invalid authentication token"):
        wrong = JobSubmissionClient(state["dashboard_url"], headers={"Authorization": "Bearer not-the-token"})
        wrong.submit_job(entrypoint="echo should-not-run")
    assert not any("should-not-run" in job.entrypoint for job in jobs.list_jobs())  # refused, not queued
    token_file = Path(state["token_path"])
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.parent.stat().st_mode & 0o777 == 0o700


def test_nothing_listens_beyond_loopback(cluster, jobs):
    _, state = cluster
    assert [node["name"] for node in state["nodes"]] == ["head", "worker-1"]
    count, outside = listening_beyond_loopback(state["pid"])
    assert count >= 6  # GCS, dashboard, two raylets, agents: the check saw the cluster's sockets
    assert not outside, f"listening beyond loopback: {outside}"


def test_stages_as_jobs_then_serve_on_the_cluster(jobs, shards, cluster):
    root = shards
    first = _train(jobs, root, "cnn", "cnn-job")
    _train(jobs, root, "vit", "vit-job")
    assert "best epoch 1 of 1" in jobs.get_job_logs(first)  # the driver's log is readable through the job API
    _run(jobs, "-m", "tune.ensemble_sweep", "--profile", "demo", *_sets(root, "tune.ensemble.num_samples=20"))
    for role in ("cnn", "vit"):
        summary = json.loads((root / "train" / f"latest-{role}.json").read_text())
        assert Path(summary["best_checkpoint"]).is_dir() and summary["epochs_run"] == 1
    assert (root / "train" / "ensemble.yaml").is_file()

    port = free_port()
    serve_sets = _sets(root, f"serve.port={port}", "serve.proxy_location=HeadOnly")
    _run(jobs, "-m", "serve.cli", "--profile", "demo", "--no-block", *serve_sets)
    image = next((root / "data" / "covid").rglob("*.png")).read_bytes()
    answer = requests.post(f"http://127.0.0.1:{port}/v1/predict", data=image, params={"head": "covid"}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body["covid"]["probabilities"]) == {"COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"}
    assert body["models_used"][0] == "cnn"
    _run(jobs, "-c", "import ray; from ray import serve; ray.init(); serve.shutdown()")  # CPUs back for the next test


def _registered_checkpoints(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _kill_node_with_a_train_worker(raylet_pid: int, run_dir: Path, done: threading.Event, killed: list) -> None:
    """Once a checkpoint is registered and a training worker runs on the node, SIGKILL the node's processes."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and not done.is_set():
        try:
            processes = psutil.Process(raylet_pid).children(recursive=True)
            on_node = [p for p in processes if "RayTrainWorker" in " ".join(p.cmdline())]
        except psutil.Error:
            on_node = []
        if on_node and _registered_checkpoints(run_dir) >= 1:
            for process in [*processes, psutil.Process(raylet_pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
            killed.append(len(on_node))
            return
        time.sleep(0.2)


def test_losing_the_worker_node_mid_training_resumes_from_the_checkpoint(jobs, shards, cluster):
    root, (_, state) = shards, cluster
    worker = next(node for node in state["nodes"] if node["name"] == "worker-1")
    run_dir = root / "train" / "spread"
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_node_with_a_train_worker, args=(worker["raylet_pid"], run_dir, done, killed))
    killer.start()
    extra = ("train.epochs=6", "train.placement_strategy=SPREAD", "train.max_failures=3")
    try:
        _train(jobs, root, "cnn", "spread", *extra)
    finally:
        done.set()
        killer.join()
    assert killed, "the worker node never hosted a training worker after a checkpoint"
    summary = json.loads((root / "train" / "latest-cnn.json").read_text())
    assert summary["run_name"] == "spread" and summary["epochs_run"] == 6
    assert summary["resumed_from_epoch"] >= 1  # restarted on the head from its checkpoint, not from scratch
    assert Path(summary["best_checkpoint"]).is_dir()
    run = MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"  # one MLflow run across the restart, closed normally
    history = MlflowClient(summary["mlflow_tracking_uri"]).get_metric_history(run.info.run_id, "val_score")
    assert sorted({point.step for point in history}) == list(range(6))
