"""Classification metrics per head: AUROC per class for multi-label heads; accuracy, F1, confusion and one-vs-rest
AUROC for multi-class heads; the derived binary answer's AUROC; calibration.

Built on scikit-learn; what is ours is the handling of the label spaces (classes with one value only in a split are
left out of the macro average, not counted as 0.5; each head is scored on its own source's rows) and the expected
calibration error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from models.labels import LabelSpace, label_key


def scored_heads(pred: dict[str, np.ndarray], spaces: Sequence[LabelSpace]) -> dict[str, np.ndarray]:
    """Each image is scored (and gated) on the head of its own dataset: ``source`` is the index of its head."""
    return {space.head: pred["source"] == index for index, space in enumerate(spaces)}


def _auroc(target: np.ndarray, score: np.ndarray) -> float:
    target = np.asarray(target, dtype=bool)
    return float(roc_auc_score(target, score)) if 0 < target.sum() < len(target) else math.nan


def binary_auroc(space: LabelSpace, labels: np.ndarray, probs: np.ndarray) -> float:
    """AUROC of the head's derived binary answer (NaN when the head has none or the rows hold one answer only)."""
    if space.binary is None or not len(labels):
        return math.nan
    return _auroc(space.binary_target(labels), space.binary_probability(probs))


def multilabel_auroc(space: LabelSpace, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Per-class AUROC, their macro mean over classes that have both values in ``labels``, and the AUROC of the
    derived binary answer (any class; ``binary``)."""
    per_class = {name: _auroc(labels[:, k], probs[:, k]) for k, name in enumerate(space.classes)}
    defined = [v for v in per_class.values() if not math.isnan(v)]
    return {
        "per_finding": per_class,
        "macro": float(np.mean(defined)) if defined else math.nan,
        "binary": binary_auroc(space, labels, probs),
    }


def multiclass_metrics(space: LabelSpace, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1, confusion matrix, one-vs-rest AUROC per class and their
    macro mean, and the derived binary answer's AUROC."""
    classes = space.classes
    predicted = probs.argmax(axis=1)
    indices = list(range(len(classes)))
    auroc = {name: _auroc(labels == k, probs[:, k]) for k, name in enumerate(classes)}
    defined = [v for v in auroc.values() if not math.isnan(v)]
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=indices, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predicted)) if len(labels) else math.nan,
        "macro_f1": float(np.mean(f1)) if len(labels) else math.nan,
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
        "confusion": confusion_matrix(labels, predicted, labels=indices).tolist(),
        "auroc_per_class": auroc,
        "macro_auroc": float(np.mean(defined)) if defined else math.nan,
        "binary": binary_auroc(space, labels, probs),
    }


def head_metrics(space: LabelSpace, pred: dict[str, np.ndarray], index: int) -> dict[str, Any]:
    """The head's metrics on the rows of its own source (``index``: the head's position, its source id)."""
    rows = pred["source"] == index
    labels, probs = pred[label_key(space.head)][rows], pred[space.head][rows]
    if not rows.any():
        return {}
    return multilabel_auroc(space, labels, probs) if space.multi_label else multiclass_metrics(space, labels, probs)


def binary_name(space: LabelSpace) -> str:
    """The headline key of a head's binary answer: ``nih14_abnormal_auroc``, ``pneumonia_binary_auroc``."""
    return f"{space.head}_{'binary' if space.binary == space.head else space.binary}_auroc"


def main_key(space: LabelSpace) -> str:
    """The headline key of a head's main figure, the one the score and the ensemble's quality average: macro AUROC
    for a multi-label head (``nih14_macro_auroc``), macro F1 for a multi-class one (``covid_macro_f1``)."""
    return f"{space.head}_macro_auroc" if space.multi_label else f"{space.head}_macro_f1"


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


def head_calibration(space: LabelSpace, pred: dict[str, np.ndarray], index: int, bins: int = 15) -> dict[str, Any]:
    """A head's expected calibration error on the rows of its own source (``index``).

    Multi-class: the top-1 probability against whether the top class is right. Multi-label: every class probability
    against that class's label (a probability of 0.7 should be right 70% of the time). NaN without rows.
    """
    rows = pred["source"] == index
    if not rows.any():
        return {"ece": math.nan, "bins": []}
    probs, labels = pred[space.head][rows], pred[label_key(space.head)][rows]
    if space.multi_label:
        return expected_calibration_error(probs.ravel(), labels.ravel(), bins)
    return expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)


def headline(
    predictions: dict[str, np.ndarray], spaces: Sequence[LabelSpace], heads: dict[str, dict] | None = None
) -> dict[str, float]:
    """The figures tracked per epoch, per head: a multi-label head's macro AUROC, a multi-class head's accuracy,
    macro F1 and macro AUROC, and the binary answer's AUROC where the head has one; and the score, the mean over
    heads of their main figure (macro AUROC for multi-label, macro F1 for multi-class), over heads with rows.
    ``heads``: each head's ``head_metrics``, where the caller has them already."""
    figures: dict[str, float] = {}
    mains = []
    for index, space in enumerate(spaces):
        found = heads[space.head] if heads is not None else head_metrics(space, predictions, index)
        if space.multi_label:
            figures[f"{space.head}_macro_auroc"] = found.get("macro", math.nan)
        else:
            figures[f"{space.head}_accuracy"] = found.get("accuracy", math.nan)
            figures[f"{space.head}_macro_f1"] = found.get("macro_f1", math.nan)
            figures[f"{space.head}_macro_auroc"] = found.get("macro_auroc", math.nan)
        if space.binary is not None:
            figures[binary_name(space)] = found.get("binary", math.nan)
        main = figures[main_key(space)]
        if not math.isnan(main):
            mains.append(main)
    figures["score"] = float(np.mean(mains)) if mains else math.nan
    return figures
