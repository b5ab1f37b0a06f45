"""Temperature scaling per head (``models/calibration.py``): it undoes a deliberately over-confident model's
sharpness (the fitted temperature, a lower ECE), keeps ranks, and travels from ensemble.yaml to evaluation and to
the router's gate settings."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration import apply_temperature, calibrate, fit_head_temperatures, fit_temperature
from models.labels import label_key
from pipelines.artifacts import EnsembleSettingsError, read_settings, write_settings
from pipelines.evaluate.metrics import head_calibration, head_metrics
from serve.schema import GateSettings
from tests.helpers import SPACES

SHARPNESS = 4.0  # the over-confident model's logits are its honest logits times this


def _over_confident(n: int = 3000, seed: int = 0) -> dict[str, np.ndarray]:
    """Every head's rows drawn from honest logits (labels sampled from them), then reported 4x sharper."""
    rng = np.random.default_rng(seed)
    source = np.arange(n) % len(SPACES)
    pred: dict[str, np.ndarray] = {"source": source}
    for space in SPACES:
        k = len(space.classes)
        logits = rng.normal(0.0, 1.2, (n, k))
        if space.multi_label:
            honest = 1.0 / (1.0 + np.exp(-logits))
            labels = (rng.random((n, k)) < honest).astype(np.int64)
            reported = 1.0 / (1.0 + np.exp(-SHARPNESS * logits))
        else:
            honest = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            labels = np.array([rng.choice(k, p=row) for row in honest])
            sharp = np.exp(SHARPNESS * logits)
            reported = sharp / sharp.sum(axis=1, keepdims=True)
        pred[space.head], pred[label_key(space.head)] = reported.astype(np.float32), labels
    return pred


def test_an_over_confident_models_temperature_is_found_and_its_ece_drops():
    pred = _over_confident()
    temperatures = fit_head_temperatures(pred, SPACES)
    calibrated = calibrate(pred, SPACES, temperatures)
    for index, space in enumerate(SPACES):
        assert temperatures[space.head] == pytest.approx(SHARPNESS, rel=0.15), space.head
        before = head_calibration(space, pred, index)["ece"]
        after = head_calibration(space, calibrated, index)["ece"]
        assert after < 0.5 * before, (space.head, before, after)


def test_ranks_are_kept_and_temperature_one_changes_nothing():
    pred = _over_confident(600, seed=1)
    space, index = SPACES[0], 0
    scaled = calibrate(pred, SPACES, {space.head: 2.5})
    assert head_metrics(space, scaled, index)["macro"] == pytest.approx(head_metrics(space, pred, index)["macro"])
    assert scaled[label_key(space.head)] is pred[label_key(space.head)]  # labels pass through
    assert apply_temperature(space, pred[space.head], 1.0) is pred[space.head]
    softmax = next(s for s in SPACES if not s.multi_label)
    one = apply_temperature(softmax, pred[softmax.head][0], 3.0)  # a single answer, as the router holds it
    assert one.sum() == pytest.approx(1.0, abs=1e-5) and one.argmax() == pred[softmax.head][0].argmax()
    assert fit_temperature(space, pred[space.head][:0], pred[label_key(space.head)][:0]) == 1.0


def test_temperatures_round_trip_through_ensemble_yaml_and_reach_the_gate_settings(tmp_path):
    path = write_settings(tmp_path / "ensemble.yaml", 0.4, 0.8, temperatures={"cnn": {"nih14": 1.7}})
    settings = read_settings(path)
    assert settings.temperatures == {"cnn": {"nih14": 1.7}}
    gate = GateSettings.from_user_config({"w_cnn": 0.4, "threshold": 0.8, "temperatures": settings.temperatures})
    assert gate.temperatures["cnn"]["nih14"] == 1.7
    with pytest.raises(ValueError, match="temperatures.cnn.nih14 must be a positive number"):
        GateSettings.from_user_config({"w_cnn": 0.4, "threshold": 0.8, "temperatures": {"cnn": {"nih14": 0}}})
    bad = write_settings(tmp_path / "bad.yaml", 0.4, 0.8, temperatures={"vit": {"covid": -1.0}})
    with pytest.raises(EnsembleSettingsError, match="temperatures.vit.covid"):
        read_settings(bad)
