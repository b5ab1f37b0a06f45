"""Ray tests of training on the session's tiny shards: a 2-worker DDP run with checkpoints and MLflow (continued
under the same run name later), kill-and-resume, an MLflow server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from models.checkpoint import load_checkpoint
from pipelines.artifacts import latest_training
from pipelines.config import load_config
from pipelines.train.driver import train
from tests.helpers import CONFIG, free_port

pytestmark = pytest.mark.ray


def _cfg(shards: Path, run_dir: Path, *extra: str):
    return load_config(
        CONFIG,
        "demo",
        [f"data.shards_dir={shards}", f"train.run_dir={run_dir}", "model.input_size=32", "train.batch_size=8", *extra],
    )


@pytest.fixture(scope="module")
def one_epoch_run(tiny_shards, tmp_path_factory) -> tuple:
    """One 2-worker CNN epoch on the session's tiny shards, run once: (config, summary, run dir). The first test
    checks what it wrote; a later one continues it."""
    run_dir = tmp_path_factory.mktemp("one-epoch")
    cfg = _cfg(tiny_shards, run_dir, "train.epochs=1")
    return cfg, train(cfg, "cnn", "one-epoch"), run_dir


def test_two_worker_run_writes_checkpoint_and_mlflow_run(one_epoch_run):
    cfg, summary, _ = one_epoch_run
    payload = load_checkpoint(summary["best_checkpoint"])
    assert payload["role"] == "cnn" and payload["arch"] == "test_efficientnet" and payload["epoch"] == 0
    assert payload["preprocessing"]["input_size"] == 32
    assert [space["head"] for space in payload["label_spaces"]] == ["nih14", "covid", "pneumonia"]
    assert latest_training(cfg, "cnn")["best_checkpoint"] == summary["best_checkpoint"]
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    heads = ("nih14_macro_auroc", "nih14_abnormal_auroc", "covid_macro_f1", "pneumonia_macro_f1")
    assert set(heads) | {"pneumonia_binary_auroc", "score"} <= set(payload["metrics"])  # NaN where val lacks a class
    assert {"val_nih14_macro_auroc", "val_pneumonia_macro_f1"} <= set(run.data.metrics)  # MLflow drops NaN
    assert run.data.params["train.num_workers"] == "2"
    assert any(a.path == "config.yaml" for a in client.list_artifacts(run.info.run_id))
    assert client.get_model_version("cxr-cnn", summary["registered_model"].split("/")[1]).run_id == run.info.run_id


def _train_worker_pids() -> list[int]:
    """Ray names its actor processes ``ray::<Class>.<method>``."""
    found = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints the run has registered (a folder on disk is not enough: its report may still be in flight)."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _kill_a_worker_after_checkpoints(run_dir: Path, done: threading.Event, killed: list[int]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not done.is_set():
        pids = _train_worker_pids()
        if pids and _registered_checkpoints(run_dir) >= 1:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(tiny_shards, tmp_path):
    cfg = _cfg(
        tiny_shards,
        tmp_path,
        "train.epochs=8",
        "model.vit.epochs=null",
        "train.max_failures=2",
        "train.early_stopping_patience=20",
    )
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after_checkpoints, args=(tmp_path / "killed", done, killed))
    killer.start()
    try:
        summary = train(cfg, "vit", "killed")
    finally:
        done.set()
        killer.join()
    assert killed, "no training worker was killed"
    assert summary["epochs_run"] == 8
    assert summary["resumed_from_epoch"] >= 1  # picked up after the last checkpoint, not from epoch 0


@pytest.mark.slow
def test_same_run_name_continues(one_epoch_run, tiny_shards):
    _, first, run_dir = one_epoch_run
    second = train(_cfg(tiny_shards, run_dir, "train.epochs=2"), "cnn", "one-epoch")
    assert (second["resumed_from_epoch"], second["epochs_run"]) == (1, 2)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]


@pytest.mark.slow
def test_training_against_a_real_mlflow_server(tiny_shards, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                MlflowClient(uri).search_experiments()
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(1)
        summary = train(
            _cfg(tiny_shards, tmp_path / "runs", "train.epochs=1", f"mlflow.tracking_uri={uri}"), "cnn", "srv"
        )
        client = MlflowClient(uri)
        run = client.get_run(summary["mlflow_run_id"])
        assert "val_score" in run.data.metrics
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
        assert client.get_registered_model("cxr-cnn").latest_versions
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
