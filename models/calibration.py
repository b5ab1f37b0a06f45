"""Temperature scaling per head: one number per model and head that makes its probabilities mean what they say.

Fitted on the validation split (``cxr tune ensemble``, before the gate is tuned) by minimising the head's negative
log-likelihood over ``T`` (logits / T; T > 1 softens an over-confident head, T < 1 sharpens a timid one). Ranks are
unchanged (per-class AUROC and top-1 accuracy stay as they were); what moves is the confidence the gate reads and the
fused probabilities. Works on probabilities, since that is what evaluation and serving hold: a sigmoid head's logits
are ``log(p / (1 - p))``, a softmax head's are ``log p`` up to a constant that softmax ignores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from models.labels import LabelSpace, label_key

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before their logits are taken
LOG_T_RANGE = (-3.0, 3.0)  # T from 0.05 to 20


def _logits(space: LabelSpace, probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p)) if space.multi_label else np.log(p)


def _from_logits(space: LabelSpace, logits: np.ndarray) -> np.ndarray:
    if space.multi_label:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def apply_temperature(space: LabelSpace, probs: np.ndarray, temperature: float) -> np.ndarray:
    """``probs`` of ``space`` ([N, K] or [K]) as if the logits had been divided by ``temperature``."""
    if temperature == 1.0:
        return probs
    return _from_logits(space, _logits(space, probs) / temperature).astype(np.asarray(probs).dtype)


def _nll(space: LabelSpace, logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = np.clip(_from_logits(space, logits / temperature), EPS, 1 - EPS)
    if space.multi_label:
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def fit_temperature(space: LabelSpace, probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the head's NLL on ``probs`` / ``labels`` (its own source's rows); 1.0 without
    rows."""
    if not len(labels):
        return 1.0
    logits = _logits(space, probs)
    labels = np.asarray(labels)
    found = minimize_scalar(
        lambda log_t: _nll(space, logits, labels, float(np.exp(log_t))), bounds=LOG_T_RANGE, method="bounded"
    )
    return float(np.exp(found.x))


def fit_head_temperatures(pred: Mapping[str, np.ndarray], spaces: Sequence[LabelSpace]) -> dict[str, float]:
    """``{head: T}`` for one model's predictions on a split (``source`` indexes ``spaces``; each head fitted on its
    own source's rows, as it is scored)."""
    found = {}
    for index, space in enumerate(spaces):
        rows = np.asarray(pred["source"]) == index
        found[space.head] = fit_temperature(space, pred[space.head][rows], pred[label_key(space.head)][rows])
    return found


def calibrate(
    probs: Mapping[str, np.ndarray], spaces: Sequence[LabelSpace], temperatures: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """Every head of ``probs`` at its temperature (a head without one keeps its probabilities); other keys (labels,
    ``source``) are passed through."""
    by_head = {space.head: space for space in spaces}
    return {
        key: apply_temperature(by_head[key], value, float(temperatures[key]))
        if key in by_head and key in temperatures
        else value
        for key, value in probs.items()
    }
