"""Metric code against scikit-learn and hand computations, per head of the registry's label spaces (a multi-label
head, a multi-class one without a binary answer, and the pneumonia head with its derived normal-vs-pneumonia
answer); checkpoint round trip."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from models.checkpoint import label_spaces_of, load_checkpoint, model_from_checkpoint, save_checkpoint
from models.factory import build_model
from models.labels import by_head, label_key
from pipelines.data.datasets.covid import COVID_CLASSES
from pipelines.data.datasets.nih import NIH14
from pipelines.data.datasets.pneumonia import CLASSES as PNEUMONIA_CLASSES
from pipelines.evaluate.metrics import (
    expected_calibration_error,
    head_calibration,
    head_metrics,
    headline,
    main_key,
    multiclass_metrics,
    multilabel_auroc,
)
from tests.helpers import SPACES

HEADS = by_head(SPACES)
NIH, COVID, PNEUMONIA = HEADS["nih14"], HEADS["covid"], HEADS["pneumonia"]


def _three_heads(n: int = 90, seed: int = 3) -> dict[str, np.ndarray]:
    """A prediction dict of the three heads, a third of the rows each (interleaved), better than chance; on the
    rows of other sources the probabilities are noise and the labels are filled (zeros, -1), as in the batches."""
    rng = np.random.default_rng(seed)
    source = np.arange(n) % 3
    nih_labels = (rng.random((n, 14)) < 0.3).astype(np.float32) * (source == 0)[:, None]
    nih_labels[np.arange(n) % 2 == 0] = 0.0  # every other NIH image is "No Finding": the abnormal answer has both
    nih = np.clip(nih_labels * 0.3 + rng.random((n, 14)) * 0.7, 0, 1)
    pred = {"source": source, "nih14": nih, label_key("nih14"): nih_labels}
    for index, (head, k) in enumerate((("covid", len(COVID_CLASSES)), ("pneumonia", len(PNEUMONIA_CLASSES))), 1):
        labels = np.where(source == index, rng.integers(0, k, n), -1)
        probs = rng.dirichlet(np.ones(k), n)
        probs[source == index, labels[source == index]] += rng.random((source == index).sum())
        pred[head], pred[label_key(head)] = probs / probs.sum(1, keepdims=True), labels
    return pred


def test_multilabel_auroc_matches_sklearn_and_skips_single_class_findings():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 14)) < 0.3).astype(int)
    labels[:, 13] = 0  # no Hernia in this split
    probs = np.clip(labels * 0.3 + rng.random((200, 14)) * 0.7, 0, 1)
    result = multilabel_auroc(NIH, labels, probs)
    expected = [roc_auc_score(labels[:, k], probs[:, k]) for k in range(13)]
    assert list(result["per_finding"]) == list(NIH14) and math.isnan(result["per_finding"]["Hernia"])
    np.testing.assert_allclose([result["per_finding"][n] for n in NIH14[:13]], expected)
    np.testing.assert_allclose(result["macro"], np.mean(expected))
    # the abnormal answer: any finding vs No Finding, scored by the most likely finding
    np.testing.assert_allclose(result["binary"], roc_auc_score(labels.any(axis=1), probs.max(axis=1)))


def test_abnormal_auroc_is_undefined_without_both_answers():
    labels = np.zeros((5, 14), dtype=int)
    labels[:, 2] = 1  # every image has Effusion: no normal image to rank against
    assert math.isnan(multilabel_auroc(NIH, labels, np.full((5, 14), 0.3))["binary"])


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), 300)
    probs[np.arange(300), labels] += rng.random(300)  # better than chance
    probs /= probs.sum(1, keepdims=True)
    result = multiclass_metrics(COVID, labels, probs)
    predicted = probs.argmax(1)
    assert result["accuracy"] == np.mean(predicted == labels)
    np.testing.assert_allclose(result["macro_f1"], f1_score(labels, predicted, average="macro"))
    np.testing.assert_allclose(result["macro_auroc"], roc_auc_score(labels, probs, multi_class="ovr"))
    np.testing.assert_allclose(result["per_class"]["Normal"]["f1"], f1_score(labels == 2, predicted == 2))
    assert np.array(result["confusion"]).sum() == 300
    assert np.trace(np.array(result["confusion"])) == (predicted == labels).sum()
    assert math.isnan(result["binary"])  # covid has no binary answer


def test_head_metrics_score_each_head_on_its_own_rows_only():
    pred = _three_heads()
    for index, space in enumerate(SPACES):
        rows = pred["source"] == index
        alone = {k: v[rows] for k, v in pred.items()}
        alone["source"] = np.full(rows.sum(), index)
        assert head_metrics(space, pred, index) == head_metrics(space, alone, index)  # other rows change nothing
    empty = {**pred, "source": np.zeros(len(pred["source"]), int)}
    assert head_metrics(PNEUMONIA, empty, 2) == {}


def test_headline_of_three_heads_against_sklearn():
    pred = _three_heads()
    figures = headline(pred, SPACES)
    expected_keys = {"nih14_macro_auroc", "nih14_abnormal_auroc", "score"}
    for head in ("covid", "pneumonia"):
        expected_keys |= {f"{head}_accuracy", f"{head}_macro_f1", f"{head}_macro_auroc"}
    assert set(figures) == expected_keys | {"pneumonia_binary_auroc"}

    rows = pred["source"] == 2
    labels, probs = pred["label_pneumonia"][rows], pred["pneumonia"][rows]
    predicted = probs.argmax(1)
    np.testing.assert_allclose(figures["pneumonia_accuracy"], accuracy_score(labels, predicted))
    np.testing.assert_allclose(figures["pneumonia_macro_f1"], f1_score(labels, predicted, average="macro"))
    np.testing.assert_allclose(figures["pneumonia_macro_auroc"], roc_auc_score(labels, probs, multi_class="ovr"))
    # the binary answer: pneumonia (bacterial or viral) vs normal, scored by P(bacterial) + P(viral)
    normal = PNEUMONIA_CLASSES.index("normal")
    np.testing.assert_allclose(
        figures["pneumonia_binary_auroc"], roc_auc_score(labels != normal, probs[:, 1] + probs[:, 2])
    )
    nih = pred["source"] == 0
    assert not math.isnan(figures["nih14_abnormal_auroc"])
    np.testing.assert_allclose(
        figures["nih14_abnormal_auroc"],
        roc_auc_score(pred["label_nih14"][nih].any(1), pred["nih14"][nih].max(1)),
    )
    mains = [figures[main_key(space)] for space in SPACES]
    assert not any(math.isnan(value) for value in figures.values())
    assert [main_key(s) for s in SPACES] == ["nih14_macro_auroc", "covid_macro_f1", "pneumonia_macro_f1"]
    np.testing.assert_allclose(figures["score"], np.mean(mains))


def test_headline_leaves_a_head_without_rows_out_of_the_score():
    pred = _three_heads()
    pred["source"] = np.where(pred["source"] == 2, 1, pred["source"])  # no pneumonia images
    pred["label_covid"] = np.where(pred["source"] == 1, np.maximum(pred["label_covid"], 0), -1)
    figures = headline(pred, SPACES)
    assert math.isnan(figures["pneumonia_macro_f1"]) and math.isnan(figures["pneumonia_binary_auroc"])
    np.testing.assert_allclose(figures["score"], np.mean([figures["nih14_macro_auroc"], figures["covid_macro_f1"]]))


def test_head_calibration_per_kind_of_head():
    pred = _three_heads()
    rows = pred["source"] == 2
    probs, labels = pred["pneumonia"][rows], pred["label_pneumonia"][rows]
    top1 = expected_calibration_error(probs.max(1), probs.argmax(1) == labels)
    assert head_calibration(PNEUMONIA, pred, 2) == top1  # multi-class: top-1 confidence against correct
    nih = pred["source"] == 0
    every = expected_calibration_error(pred["nih14"][nih].ravel(), pred["label_nih14"][nih].ravel())
    assert head_calibration(NIH, pred, 0) == every  # multi-label: every class probability against its label
    none = head_calibration(PNEUMONIA, {**pred, "source": np.zeros_like(pred["source"])}, 2)
    assert math.isnan(none["ece"]) and none["bins"] == []


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


def test_checkpoint_round_trip(tmp_path):
    model = build_model("test_vit", 32, SPACES, mean=0.4, std=0.3)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, role="vit", epoch=3, config={"a": 1}, metrics={"score": 0.5}, optimizer=optimizer)
    payload = load_checkpoint(tmp_path)
    pre = payload["preprocessing"]
    assert payload["epoch"] == 3 and (pre["input_size"], pre["channels"], pre["input_dtype"]) == (32, 1, "uint8")
    assert np.isclose(pre["mean"], 0.4) and np.isclose(pre["std"], 0.3)
    assert label_spaces_of(payload) == SPACES
    restored = model_from_checkpoint(tmp_path)
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    model.eval()
    for space in SPACES:
        assert torch.allclose(restored(images)[space.head], model(images)[space.head])
    assert tuple(restored.label_spaces) == SPACES
    assert (tmp_path / "meta.json").is_file()
