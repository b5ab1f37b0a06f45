"""Metric code against scikit-learn and hand computations; checkpoint round trip."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import f1_score, roc_auc_score

from models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from models.factory import build_model
from pipelines.evaluate.metrics import covid_metrics, expected_calibration_error, headline, nih_auroc


def test_nih_auroc_matches_sklearn_and_skips_single_class_findings():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 14)) < 0.3).astype(int)
    labels[:, 13] = 0  # no Hernia in this split
    probs = np.clip(labels * 0.3 + rng.random((200, 14)) * 0.7, 0, 1)
    result = nih_auroc(labels, probs)
    expected = [roc_auc_score(labels[:, k], probs[:, k]) for k in range(13)]
    assert math.isnan(result["per_finding"]["Hernia"])
    np.testing.assert_allclose([result["per_finding"][n] for n in list(result["per_finding"])[:13]], expected)
    np.testing.assert_allclose(result["macro"], np.mean(expected))
    # the abnormal answer: any finding vs No Finding, scored by the most likely finding
    np.testing.assert_allclose(result["abnormal"], roc_auc_score(labels.any(axis=1), probs.max(axis=1)))


def test_abnormal_auroc_is_undefined_without_both_answers():
    labels = np.zeros((5, 14), dtype=int)
    labels[:, 2] = 1  # every image has Effusion: no normal image to rank against
    assert math.isnan(nih_auroc(labels, np.full((5, 14), 0.3))["abnormal"])


def test_covid_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), 300)
    probs[np.arange(300), labels] += rng.random(300)  # better than chance
    probs /= probs.sum(1, keepdims=True)
    result = covid_metrics(labels, probs, ("A", "B", "C", "D"))
    predicted = probs.argmax(1)
    assert result["accuracy"] == np.mean(predicted == labels)
    np.testing.assert_allclose(result["macro_f1"], f1_score(labels, predicted, average="macro"))
    assert np.array(result["confusion"]).sum() == 300
    assert np.trace(np.array(result["confusion"])) == (predicted == labels).sum()


def test_ece_against_a_hand_computation_and_sklearn_bins():
    rng = np.random.default_rng(2)
    confidences = rng.random(1000)
    correct = rng.random(1000) < confidences  # calibrated by construction
    result = expected_calibration_error(confidences, correct, bins=10)
    edges = np.linspace(0, 1, 11)
    expected = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        members = (confidences > low) & (confidences <= high)
        if members.any():
            expected += members.mean() * abs(correct[members].mean() - confidences[members].mean())
    np.testing.assert_allclose(result["ece"], expected)
    frac_pos, mean_pred = calibration_curve(correct, confidences, n_bins=10)
    np.testing.assert_allclose([b["accuracy"] for b in result["bins"]], frac_pos)
    np.testing.assert_allclose([b["confidence"] for b in result["bins"]], mean_pred)
    overconfident = expected_calibration_error(np.full(1000, 0.95), correct, bins=10)
    assert overconfident["ece"] > 0.3


def test_headline_combines_both_heads():
    pred = {
        "source": np.array([0, 0, 0, 0, 1, 1]),
        "nih14": np.tile(np.linspace(0.1, 0.9, 4)[:, None], (1, 14)).repeat(1, 0).tolist(),
        "nih_labels": np.tile(np.array([0, 0, 1, 1])[:, None], (1, 14)),
        "covid": np.array([[0.9, 0.1]] * 4 + [[0.8, 0.2], [0.3, 0.7]]),
        "covid_label": np.array([-1, -1, -1, -1, 0, 1]),
    }
    pred["nih14"] = np.array(pred["nih14"] + [[0.5] * 14] * 2)
    pred["nih_labels"] = np.vstack([pred["nih_labels"], np.zeros((2, 14))])
    h = headline(pred, ("COVID", "Normal"))
    assert h["nih_macro_auroc"] == 1.0 and h["covid_accuracy"] == 1.0 and h["score"] == 1.0


def test_checkpoint_round_trip(tmp_path):
    model = build_model("test_vit", 32, covid_classes=("COVID", "Normal", "Viral Pneumonia"), mean=0.4, std=0.3)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, role="vit", epoch=3, config={"a": 1}, metrics={"score": 0.5}, optimizer=optimizer)
    payload = load_checkpoint(tmp_path)
    pre = payload["preprocessing"]
    assert payload["epoch"] == 3 and (pre["input_size"], pre["channels"], pre["input_dtype"]) == (32, 1, "uint8")
    assert np.isclose(pre["mean"], 0.4) and np.isclose(pre["std"], 0.3)
    restored = model_from_checkpoint(tmp_path)
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    model.eval()
    assert torch.allclose(restored(images)["covid"], model(images)["covid"])
    assert restored.covid_classes == ("COVID", "Normal", "Viral Pneumonia")
    assert (tmp_path / "meta.json").is_file()
