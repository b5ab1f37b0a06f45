"""Ray Tune on the session's local Ray: the ensemble sweep (stage B) on hand-made predictions whose best region is
known; the training sweep (stage A: 2 tiny trials on the session's tiny shards, MLflow parent and child runs,
best-config YAML) and its resume after an interruption."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import EnsembleTuneConfig, load_config
from pipelines.evaluate.metrics import main_key
from pipelines.train.driver import config_with_tune_result
from tests.helpers import CONFIG, ROOT, SPACES

pytestmark = pytest.mark.ray

SETTINGS = EnsembleTuneConfig(num_samples=30, objective="constrained", max_vit_fraction=0.5)


@pytest.mark.ray
def test_ensemble_sweep_finds_the_known_region(ray_session, tmp_path, handmade_predictions):
    from tune.ensemble_sweep import choose, search

    cnn, vit = handmade_predictions
    spaces = tuple(space for space in SPACES if space.head in cnn)
    frame = search(cnn, vit, spaces, SETTINGS, tmp_path, seed=1, start={"w_cnn": 0.4, "threshold": 0.85})
    assert len(frame) == SETTINGS.num_samples
    assert {main_key(space) for space in spaces} <= set(frame.columns)  # every head's figures, a column each
    best = choose(frame)
    assert best["objective"] == pytest.approx(1.0) and best["vit_fraction"] == pytest.approx(0.4)
    assert 0.55 < best["threshold"] <= 0.97 and best["w_cnn"] < 0.743
    # every sampled point lies in the search space, and infeasible points rank below feasible ones
    assert frame["threshold"].between(0.5, 1.0).all() and frame["w_cnn"].between(0.0, 1.0).all()
    assert (frame.loc[~frame["feasible"], "objective"] < 0).all()


# ------------------------------------------------------------------------------------- stage A on tiny data


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

    cfg = load_config(CONFIG, "demo", _sweep_sets(tiny_shards, tmp_path, 1))
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


@pytest.mark.ray
@pytest.mark.slow
def test_stage_b_calibrates_first_and_evaluation_applies_the_temperatures(tiny_shards, tiny_checkpoints, tmp_path):
    """`cxr tune ensemble` fits a temperature per model and head on the validation split, the referral floor and the
    out-of-distribution check, writes them beside the gate, and `cxr evaluate` reports and applies them."""
    import shutil

    from pipelines.artifacts import read_settings
    from pipelines.evaluate.evaluation import evaluate
    from pipelines.evaluate.negatives import KINDS
    from tune.ensemble_sweep import tune_ensemble

    checkpoints = {role: shutil.copytree(path, tmp_path / role) for role, path in tiny_checkpoints.items()}
    sets = ["data.storage_size=32", f"data.shards_dir={tiny_shards}", f"train.run_dir={tmp_path / 'run'}"]
    sets += ["tune.ensemble.num_samples=6", "evaluate.bootstrap_replicates=0"]
    cfg = load_config(CONFIG, "demo", sets)
    result = tune_ensemble(cfg, checkpoints["cnn"], checkpoints["vit"], tmp_path / "run" / "ensemble.yaml")
    settings = read_settings(result["path"])
    heads = {space.head for space in SPACES}
    assert set(settings.temperatures) == {"cnn", "vit"}
    assert all(set(found) == heads and min(found.values()) > 0 for found in settings.temperatures.values())
    assert set(result["calibration"]["cnn"]["covid"]) == {"temperature", "ece_before", "ece_after"}
    assert 0.0 < settings.refer_below < 1.0  # the floor that leaves 95% of validation answers standing
    detector = settings.ood_detector()  # ood.npz beside ensemble.yaml, its threshold recorded there
    assert settings.ood["detector"] == str(tmp_path / "run" / "ood.npz") and detector.false_refusal == 0.01
    assert detector.threshold == pytest.approx(settings.ood["threshold"], rel=1e-5)

    summary = evaluate(cfg, checkpoints["cnn"], checkpoints["vit"], tmp_path / "evaluation", explain_per_class=0)
    scaling = summary["temperature_scaling"]
    assert scaling["vit"]["nih14"]["temperature"] == pytest.approx(settings.temperatures["vit"]["nih14"])
    report = (tmp_path / "evaluation" / "report.md").read_text()
    assert "## Calibration (temperature scaling)" in report and "## Referral: coverage against quality" in report
    assert summary["referral"]["refer_below"] == pytest.approx(settings.refer_below)
    assert (tmp_path / "evaluation" / "calibration_covid.png").is_file()  # before and after, per model
    ood = summary["ood"]
    assert ood["threshold"] == pytest.approx(detector.threshold) and ood["test"]["images"] == summary["test_images"]
    assert set(ood["negatives"]) == set(KINDS) and min(r["refused"] for r in ood["negatives"].values()) == 1.0
    assert "## Out-of-distribution refusal" in report
