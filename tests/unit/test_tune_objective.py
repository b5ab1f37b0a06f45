"""Tune without Ray: the ensemble objective on hand-made predictions whose best region is known (the
``handmade_predictions`` fixture), the reference points, the prediction table and the choice among equals. The
sweeps themselves are in tests/ray/test_tune_sweeps.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.config import EnsembleTuneConfig
from tune.objective import evaluate_point, reference_points
from tune.predictions import from_table, to_table

CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
SETTINGS = EnsembleTuneConfig(num_samples=30, objective="constrained", max_vit_fraction=0.5, nih_weight=0.5)


def test_point_in_the_known_region_is_perfect_and_sends_the_hard_40_percent(handmade_predictions):
    cnn, vit = handmade_predictions
    point = evaluate_point(cnn, vit, 0.4, 0.8, CLASSES, SETTINGS)
    assert point["quality"] == pytest.approx(1.0)
    assert point["vit_fraction"] == pytest.approx(0.4)
    assert point["feasible"] and point["objective"] == pytest.approx(1.0)


def test_gate_and_weight_outside_the_region_cost_quality_or_feasibility(handmade_predictions):
    cnn, vit = handmade_predictions
    too_low = evaluate_point(cnn, vit, 0.4, 0.52, CLASSES, SETTINGS)  # only the unsure nih14 rows escalate
    assert too_low["vit_fraction"] == pytest.approx(0.2) and too_low["covid_macro_f1"] < 0.9
    too_high = evaluate_point(cnn, vit, 0.4, 0.99, CLASSES, SETTINGS)  # everything escalates
    assert too_high["vit_fraction"] == pytest.approx(1.0) and not too_high["feasible"] and too_high["objective"] < 0
    cnn_heavy = evaluate_point(cnn, vit, 0.9, 0.8, CLASSES, SETTINGS)  # the CNN's wrong answer wins the fusion
    assert cnn_heavy["covid_accuracy"] < 0.7


def test_tradeoff_objective_charges_the_vit_fraction(handmade_predictions):
    cnn, vit = handmade_predictions
    tradeoff = SETTINGS.model_copy(update={"objective": "tradeoff", "vit_cost": 0.25})
    point = evaluate_point(cnn, vit, 0.4, 0.8, CLASSES, tradeoff)
    assert point["objective"] == pytest.approx(1.0 - 0.25 * 0.4)


def test_reference_points_bracket_the_adaptive_one(handmade_predictions):
    cnn, vit = handmade_predictions
    refs = reference_points(cnn, vit, 0.4, 0.8, CLASSES, SETTINGS)
    assert refs["cnn_only"]["vit_fraction"] == 0.0 and refs["always_ensemble"]["vit_fraction"] == 1.0
    assert refs["cnn_only"]["quality"] < refs["adaptive"]["quality"] == pytest.approx(1.0)


def test_prediction_cache_table_round_trip(handmade_predictions):
    cnn, _ = handmade_predictions
    back = from_table(to_table(cnn))
    for key, value in cnn.items():
        np.testing.assert_allclose(back[key], value, rtol=0, atol=1e-7)


def test_choose_prefers_fewer_vit_calls_among_equals():
    from tune.ensemble_sweep import choose

    frame = pd.DataFrame(
        {"w_cnn": [0.3, 0.5, 0.6], "threshold": [0.9, 0.8, 0.7], "objective": [0.9, 0.9, 0.8]}
        | {"vit_fraction": [0.4, 0.3, 0.1]}
    )
    assert choose(frame)["threshold"] == 0.8
