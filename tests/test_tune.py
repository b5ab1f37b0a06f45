"""Tune: the ensemble objective and sweep on hand-made predictions whose best region is known; the training sweep
(2 tiny trials, MLflow parent and child runs, best-config YAML) and its resume after an interruption."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import EnsembleTuneConfig, load_config
from pipelines.train.driver import config_with_tune_result
from tune.objective import evaluate_point, reference_points
from tune.predictions import from_table, to_table

CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
ROOT = Path(__file__).resolve().parents[1]


def handmade(n_nih: int = 40, n_covid: int = 40, seed: int = 0):
    """40% of each dataset is 'hard': the CNN is unsure (confidence 0.5 on nih14, 0.55 on covid) and wrong on
    covid; elsewhere it is confident (>= 0.97) and right. The ViT is right everywhere with confidence 0.85-0.9.

    So a threshold in (0.55, 0.97] sends exactly the hard 40% to the ViT, and any w_cnn < 0.743 then fixes
    every covid answer (0.25 w + 0.9 (1 - w) > 0.55 w + 0.033 (1 - w)); nih14 AUROC is 1 for any w < 1.
    """
    rng = np.random.default_rng(seed)
    nih_labels = (rng.random((n_nih, 14)) < 0.5).astype(np.float32)
    nih_labels[0], nih_labels[1] = 1.0, 0.0  # every finding has positives and negatives
    covid_label = np.arange(n_covid) % 4
    hard_nih = np.arange(n_nih) % 5 < 2
    hard_covid = np.arange(n_covid) % 5 < 2
    source = np.r_[np.zeros(n_nih, np.int8), np.ones(n_covid, np.int8)]
    labels_all = np.r_[nih_labels, np.zeros((n_covid, 14), np.float32)]
    covid_all = np.r_[np.zeros(n_nih, np.int64), covid_label]

    cnn_nih = np.where(hard_nih[:, None], 0.5, np.where(nih_labels > 0, 0.98, 0.02))
    vit_nih = np.where(nih_labels > 0, 0.85, 0.15)
    onehot = np.eye(4)[covid_label]
    wrong = np.eye(4)[(covid_label + 1) % 4]
    cnn_covid = np.where(hard_covid[:, None], 0.55 * wrong + 0.25 * onehot + 0.1 * (1 - wrong - onehot), 0.97 * onehot)
    cnn_covid = np.where(hard_covid[:, None], cnn_covid, cnn_covid + 0.01 * (1 - onehot))
    vit_covid = 0.9 * onehot + (0.1 / 3) * (1 - onehot)

    def pack(nih_probs, covid_probs):
        return {
            "source": source,
            "nih_labels": labels_all,
            "covid_label": covid_all,
            "nih14": np.r_[nih_probs, np.full((n_covid, 14), 0.5)].astype(np.float32),
            "covid": np.r_[np.full((n_nih, 4), 0.25), covid_probs].astype(np.float32),
        }

    return pack(cnn_nih, cnn_covid), pack(vit_nih, vit_covid)


SETTINGS = EnsembleTuneConfig(num_samples=30, objective="constrained", max_vit_fraction=0.5, nih_weight=0.5)


def test_point_in_the_known_region_is_perfect_and_sends_the_hard_40_percent():
    cnn, vit = handmade()
    point = evaluate_point(cnn, vit, 0.4, 0.8, CLASSES, SETTINGS)
    assert point["quality"] == pytest.approx(1.0)
    assert point["vit_fraction"] == pytest.approx(0.4)
    assert point["feasible"] and point["objective"] == pytest.approx(1.0)


def test_gate_and_weight_outside_the_region_cost_quality_or_feasibility():
    cnn, vit = handmade()
    too_low = evaluate_point(cnn, vit, 0.4, 0.52, CLASSES, SETTINGS)  # only the unsure nih14 rows escalate
    assert too_low["vit_fraction"] == pytest.approx(0.2) and too_low["covid_macro_f1"] < 0.9
    too_high = evaluate_point(cnn, vit, 0.4, 0.99, CLASSES, SETTINGS)  # everything escalates
    assert too_high["vit_fraction"] == pytest.approx(1.0) and not too_high["feasible"] and too_high["objective"] < 0
    cnn_heavy = evaluate_point(cnn, vit, 0.9, 0.8, CLASSES, SETTINGS)  # the CNN's wrong answer wins the fusion
    assert cnn_heavy["covid_accuracy"] < 0.7


def test_tradeoff_objective_charges_the_vit_fraction():
    cnn, vit = handmade()
    tradeoff = SETTINGS.model_copy(update={"objective": "tradeoff", "vit_cost": 0.25})
    point = evaluate_point(cnn, vit, 0.4, 0.8, CLASSES, tradeoff)
    assert point["objective"] == pytest.approx(1.0 - 0.25 * 0.4)


def test_reference_points_bracket_the_adaptive_one():
    cnn, vit = handmade()
    refs = reference_points(cnn, vit, 0.4, 0.8, CLASSES, SETTINGS)
    assert refs["cnn_only"]["vit_fraction"] == 0.0 and refs["always_ensemble"]["vit_fraction"] == 1.0
    assert refs["cnn_only"]["quality"] < refs["adaptive"]["quality"] == pytest.approx(1.0)


def test_prediction_cache_table_round_trip():
    cnn, _ = handmade()
    back = from_table(to_table(cnn))
    for key, value in cnn.items():
        np.testing.assert_allclose(back[key], value, rtol=0, atol=1e-7)


@pytest.mark.ray
def test_ensemble_sweep_finds_the_known_region(ray_session, tmp_path):
    from tune.ensemble_sweep import choose, search

    cnn, vit = handmade()
    frame = search(cnn, vit, CLASSES, SETTINGS, tmp_path, seed=1, start={"w_cnn": 0.4, "threshold": 0.85})
    assert len(frame) == SETTINGS.num_samples
    best = choose(frame)
    assert best["objective"] == pytest.approx(1.0) and best["vit_fraction"] == pytest.approx(0.4)
    assert 0.55 < best["threshold"] <= 0.97 and best["w_cnn"] < 0.743
    # every sampled point lies in the search space, and infeasible points rank below feasible ones
    assert frame["threshold"].between(0.5, 1.0).all() and frame["w_cnn"].between(0.0, 1.0).all()
    assert (frame.loc[~frame["feasible"], "objective"] < 0).all()


def test_choose_prefers_fewer_vit_calls_among_equals():
    from tune.ensemble_sweep import choose

    frame = pd.DataFrame(
        {"w_cnn": [0.3, 0.5, 0.6], "threshold": [0.9, 0.8, 0.7], "objective": [0.9, 0.9, 0.8]}
        | {"vit_fraction": [0.4, 0.3, 0.1]}
    )
    assert choose(frame)["threshold"] == 0.8


# ------------------------------------------------------------------------------------- stage A on tiny data


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, ray_session) -> Path:
    from layout_factory import write_layouts
    from pipelines.data.ingest import ingest

    root = tmp_path_factory.mktemp("tune-data")
    write_layouts(root, patients=24, covid_per_class=8)
    cfg = load_config(None, sets=["data.storage_size=32", "model.input_size=32", "data.rows_per_shard=16"])
    ingest(cfg, root / "nih", root / "covid", root / "shards")
    return root / "shards"


def _sweep_sets(shards: Path, run_dir: Path, epochs: int) -> list[str]:
    return [
        f"data.shards_dir={shards}",
        f"train.run_dir={run_dir}",
        "model.input_size=32",
        "train.batch_size=8",
        f"train.epochs={epochs}",
        "tune.num_samples=2",
        "tune.grace_period=1",
    ]


@pytest.mark.ray
@pytest.mark.slow
def test_training_sweep_two_trials_mlflow_and_best_config(tiny_shards, tmp_path):
    from tune.train_sweep import tune_training

    cfg = load_config(ROOT / "ray_config.yaml", "demo", _sweep_sets(tiny_shards, tmp_path, 1))
    result = tune_training(cfg, "cnn", "sweep-a")
    table = result["table"]
    assert len(table) == 2 and (table["error"] == "").all() and (table["epochs"] == 1).all()
    assert table["train.lr"].between(cfg.tune.lr_min, cfg.tune.lr_max).all()
    best = yaml.safe_load(result["best_file"].read_text())
    assert best["best_score"] == pytest.approx(table["val_score"].max())
    tuned = config_with_tune_result(cfg, result["best_file"])
    assert tuned.train.lr == pytest.approx(best["best_config"]["train.lr"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_experiment_by_name("cxr").experiment_id],
        f"tags.`mlflow.parentRunId` = '{result['parent_run_id']}'",
    )
    assert len(children) == 2 and all("val_score" in run.data.metrics for run in children)
    # artifacts of a local store stay under the run directory (not in ./mlruns of whatever the cwd is)
    parent = client.get_run(result["parent_run_id"])
    assert all(run.info.artifact_uri.startswith(tmp_path.as_uri()) for run in [parent, *children])


def _trial_states(sweep_dir: Path) -> dict[str, str]:
    """trial id -> status, from Tune's experiment state file (what a restore reads)."""
    import json

    files = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except json.JSONDecodeError:
        return {}
    trials = {}
    for entry in state.get("trial_data", []):
        data = json.loads(entry[0]) if isinstance(entry, list) else entry
        trials[data["trial_id"]] = data["status"]
    return trials


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_repeating_finished_trials(tiny_shards, tmp_path, ray_session):
    """Kill the sweep's driver once its first trial has finished; running it again keeps that trial's result and
    only runs what was left."""
    sets = _sweep_sets(tiny_shards, tmp_path, 2) + ["tune.grace_period=2"]
    command = [sys.executable, "-m", "tune.train_sweep", "--model", "cnn", "--name", "sweep-r", "--profile", "demo"]
    command += [arg for s in sets for arg in ("--set", s)]
    # the sweep joins this session's Ray as a separate job; killing its driver ends that job's trials
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    sweep_dir = tmp_path / "tune" / "sweep-r"
    first = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and "TERMINATED" not in _trial_states(sweep_dir).values():
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.5)
    finished = {t for t, s in _trial_states(sweep_dir).items() if s == "TERMINATED"}
    results_before = {t: _trial_result_file(sweep_dir, t).read_bytes() for t in finished}
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert finished and len(finished) < 2, _trial_states(sweep_dir)

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming sweep sweep-r" in second.stderr
    states = _trial_states(sweep_dir)
    assert len(states) == 2 and set(states.values()) == {"TERMINATED"}
    # a trial that is run again appends to its result.json; the finished one's is byte for byte the same
    for trial, before in results_before.items():
        assert _trial_result_file(sweep_dir, trial).read_bytes() == before
    best = yaml.safe_load((tmp_path / "tune" / "sweep-r-best.yaml").read_text())
    assert not math.isnan(best["best_score"]) and len(results_before) == 1


def _trial_result_file(sweep_dir: Path, trial_id: str) -> Path:
    (found,) = [p for p in sweep_dir.glob(f"*{trial_id}*/result.json")]
    return found
