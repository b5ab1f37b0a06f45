"""Tune without Ray: the ensemble objective on hand-made predictions whose best region is known (the
``handmade_predictions`` fixture), quality as the weighted mean of every head's main figure, the reference points,
the prediction table and the choice among equals. The sweeps themselves are in tests/ray/test_tune_sweeps.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipelines.config import EnsembleTuneConfig
from tests.helpers import SPACES
from tune.objective import evaluate_point, quality, quality_label, reference_points
from tune.predictions import from_table, to_table

SETTINGS = EnsembleTuneConfig(num_samples=30, objective="constrained", max_vit_fraction=0.5)


def _spaces(pred: dict) -> tuple:
    """The heads the hand-made predictions hold, in the registry's order (``source`` indexes them)."""
    return tuple(space for space in SPACES if space.head in pred)


def test_point_in_the_known_region_is_perfect_and_sends_the_hard_40_percent(handmade_predictions):
    cnn, vit = handmade_predictions
    point = evaluate_point(cnn, vit, 0.4, 0.8, _spaces(cnn), SETTINGS)
    assert point["quality"] == pytest.approx(1.0)
    assert point["vit_fraction"] == pytest.approx(0.4)
    assert point["feasible"] and point["objective"] == pytest.approx(1.0)
    for space in _spaces(cnn):  # every head's headline figures are in the point
        key = f"{space.head}_macro_auroc" if space.multi_label else f"{space.head}_macro_f1"
        assert point[key] == pytest.approx(1.0)
    assert "score" not in point


def test_gate_and_weight_outside_the_region_cost_quality_or_feasibility(handmade_predictions):
    cnn, vit = handmade_predictions
    spaces = _spaces(cnn)
    too_low = evaluate_point(cnn, vit, 0.4, 0.52, spaces, SETTINGS)  # only the unsure nih14 rows escalate
    assert 0 < too_low["vit_fraction"] < 0.4 and too_low["covid_macro_f1"] < 0.9
    too_high = evaluate_point(cnn, vit, 0.4, 0.99, spaces, SETTINGS)  # everything escalates
    assert too_high["vit_fraction"] == pytest.approx(1.0) and not too_high["feasible"] and too_high["objective"] < 0
    cnn_heavy = evaluate_point(cnn, vit, 0.9, 0.8, spaces, SETTINGS)  # the CNN's wrong answer wins the fusion
    assert cnn_heavy["covid_accuracy"] < 0.7


def test_tradeoff_objective_charges_the_vit_fraction(handmade_predictions):
    cnn, vit = handmade_predictions
    tradeoff = SETTINGS.model_copy(update={"objective": "tradeoff", "vit_cost": 0.25})
    point = evaluate_point(cnn, vit, 0.4, 0.8, _spaces(cnn), tradeoff)
    assert point["objective"] == pytest.approx(1.0 - 0.25 * 0.4)


def test_reference_points_bracket_the_adaptive_one(handmade_predictions):
    cnn, vit = handmade_predictions
    refs = reference_points(cnn, vit, 0.4, 0.8, _spaces(cnn), SETTINGS)
    assert refs["cnn_only"]["vit_fraction"] == 0.0 and refs["always_ensemble"]["vit_fraction"] == 1.0
    assert refs["cnn_only"]["quality"] < refs["adaptive"]["quality"] == pytest.approx(1.0)


def test_quality_is_the_weighted_mean_of_every_heads_main_figure():
    figures = {"nih14_macro_auroc": 0.8, "covid_macro_f1": 0.6, "pneumonia_macro_f1": 0.9, "covid_accuracy": 0.1}
    assert quality(figures, SPACES, {}) == pytest.approx((0.8 + 0.6 + 0.9) / 3)  # every head weighs 1.0
    weighted = quality(figures, SPACES, {"nih14": 2.0, "pneumonia": 0.5})  # covid, not named, weighs 1.0
    assert weighted == pytest.approx((2.0 * 0.8 + 1.0 * 0.6 + 0.5 * 0.9) / 3.5)
    assert quality(figures, SPACES, {"covid": 0.0, "pneumonia": 0.0}) == pytest.approx(0.8)
    assert quality({**figures, "pneumonia_macro_f1": math.nan}, SPACES, {}) == pytest.approx(0.7)  # NaN left out
    assert math.isnan(quality(figures, SPACES, {head: 0.0 for head in ("nih14", "covid", "pneumonia")}))
    assert quality_label(SPACES, {}) == "mean of nih14 AUROC, covid F1, pneumonia F1"
    assert quality_label(SPACES, {"nih14": 2}) == "weighted mean of 2 x nih14 AUROC + 1 x covid F1 + 1 x pneumonia F1"


def test_head_weights_steer_the_quality_of_a_point(handmade_predictions):
    cnn, vit = handmade_predictions
    spaces = _spaces(cnn)
    plain = evaluate_point(cnn, vit, 0.4, 0.52, spaces, SETTINGS)  # nih14 is perfect there, covid is not
    nih_only = SETTINGS.model_copy(update={"head_weights": {s.head: 0.0 for s in spaces if s.head != "nih14"}})
    assert evaluate_point(cnn, vit, 0.4, 0.52, spaces, nih_only)["quality"] == pytest.approx(1.0)
    assert plain["quality"] < 0.95
    mains = [plain["nih14_macro_auroc"], *(plain[f"{s.head}_macro_f1"] for s in spaces if not s.multi_label)]
    assert plain["quality"] == pytest.approx(np.mean(mains))


def test_prediction_cache_table_round_trip(handmade_predictions):
    cnn, _ = handmade_predictions
    spaces = _spaces(cnn)
    back, back_spaces = from_table(to_table(cnn, spaces))
    assert back_spaces == spaces and set(back) == set(cnn)
    for key, value in cnn.items():
        np.testing.assert_allclose(back[key], value, rtol=0, atol=1e-7)


def test_choose_prefers_fewer_vit_calls_among_equals():
    from tune.ensemble_sweep import choose

    frame = pd.DataFrame(
        {"w_cnn": [0.3, 0.5, 0.6], "threshold": [0.9, 0.8, 0.7], "objective": [0.9, 0.9, 0.8]}
        | {"vit_fraction": [0.4, 0.3, 0.1]}
    )
    assert choose(frame)["threshold"] == 0.8
