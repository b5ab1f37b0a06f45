"""Classification metrics for both heads: AUROC per finding, accuracy/F1/confusion for COVID, calibration.

Built on scikit-learn; what is ours is the handling of the two label spaces (findings with one class only in a
split are left out of the macro average, not counted as 0.5) and the expected calibration error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from models.labels import NIH14, abnormal_probability


def scored_heads(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each image is scored (and gated) on the head of its own dataset: source 0 is NIH, 1 is COVID."""
    return {"nih14": pred["source"] == 0, "covid": pred["source"] == 1}


def nih_auroc(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Per-finding AUROC, their macro mean over findings that have both classes in ``labels``, and the AUROC of
    the binary abnormal answer (any finding)."""
    per_finding = {}
    for k, name in enumerate(NIH14):
        column = labels[:, k]
        per_finding[name] = float(roc_auc_score(column, probs[:, k])) if 0 < column.sum() < len(column) else math.nan
    defined = [v for v in per_finding.values() if not math.isnan(v)]
    abnormal = labels.any(axis=1)
    return {
        "per_finding": per_finding,
        "macro": float(np.mean(defined)) if defined else math.nan,
        # any finding vs No Finding, scored by abnormal_probability
        "abnormal": float(roc_auc_score(abnormal, abnormal_probability(probs)))
        if 0 < abnormal.sum() < len(abnormal)
        else math.nan,
    }


def covid_metrics(labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    predicted = probs.argmax(axis=1)
    indices = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=indices, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predicted)) if len(labels) else math.nan,
        "macro_f1": float(np.mean(f1)) if len(labels) else math.nan,
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
        "confusion": confusion_matrix(labels, predicted, labels=indices).tolist(),
    }


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """ECE over equal-width confidence bins, with the per-bin table a reliability diagram draws."""
    confidences, correct = np.asarray(confidences, dtype=float), np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = index == b
        if not members.any():
            continue
        accuracy, confidence = correct[members].mean(), confidences[members].mean()
        ece += members.mean() * abs(accuracy - confidence)
        table.append(
            {
                "low": edges[b],
                "high": edges[b + 1],
                "count": int(members.sum()),
                "accuracy": accuracy,
                "confidence": confidence,
            }
        )
    return {"ece": float(ece), "bins": table}


def headline(predictions: dict[str, np.ndarray], covid_classes: tuple[str, ...]) -> dict[str, float]:
    """The figures tracked per epoch: nih14 macro and abnormal AUROC, covid accuracy and macro F1, and the score
    (the mean of the macro AUROC and the macro F1)."""
    nih = predictions["source"] == 0
    covid = ~nih
    nih_figures = nih_auroc(predictions["nih_labels"][nih], predictions["nih14"][nih]) if nih.any() else {}
    auroc, abnormal = nih_figures.get("macro", math.nan), nih_figures.get("abnormal", math.nan)
    cm = (
        covid_metrics(predictions["covid_label"][covid], predictions["covid"][covid], covid_classes)
        if covid.any()
        else {}
    )
    accuracy, macro_f1 = cm.get("accuracy", math.nan), cm.get("macro_f1", math.nan)
    parts = [v for v in (auroc, macro_f1) if not math.isnan(v)]
    return {
        "nih_macro_auroc": auroc,
        "nih_abnormal_auroc": abnormal,
        "covid_accuracy": accuracy,
        "covid_macro_f1": macro_f1,
        "score": float(np.mean(parts)) if parts else math.nan,
    }
