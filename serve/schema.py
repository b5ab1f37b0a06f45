"""The JSON the HTTP API answers with (version v1): predictions, errors and the live gate settings.

A prediction answers every head of the model (its label spaces, from the checkpoint): ``heads`` lists them in
order and each has its object under its own name (``head_answer``), so no head is named here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from models.ensemble import confidence
from models.labels import LabelSpace, by_head

API_VERSION = "v1"
MODES = ("adaptive", "cnn", "vit", "ensemble")
BINARY_CUTOFF = 0.5  # a multi-class head's binary answer is "yes" from this probability of its non-negative classes


@dataclass(frozen=True)
class GateSettings:
    """What ``user_config`` carries to the router; ``reconfigure`` swaps it without restarting any replica."""

    w_cnn: float
    threshold: float
    finding_threshold: float = 0.5
    finding_thresholds: dict[str, float] = field(default_factory=dict)
    source: str = "config"  # where w_cnn and threshold came from: an ensemble.yaml path or "config"
    tuned_for: dict[str, Any] = field(default_factory=dict)
    # {role: {head: T}} from ensemble.yaml: each model's probabilities are calibrated before fusion and the gate
    temperatures: dict[str, dict[str, float]] = field(default_factory=dict)
    refer_below: float = 0.0  # an answer less confident than this says "refer": true (0: never)

    @classmethod
    def from_user_config(cls, user_config: dict[str, Any]) -> GateSettings:
        known = {"w_cnn", "threshold", "finding_threshold", "finding_thresholds", "source", "tuned_for", "temperatures",
                 "refer_below"}  # fmt: skip
        unknown = sorted(set(user_config) - known)
        if unknown:
            raise ValueError(f"user_config: unknown keys {unknown}; known: {sorted(known)}")
        settings = cls(**user_config)
        values = {name: getattr(settings, name) for name in ("w_cnn", "threshold", "finding_threshold", "refer_below")}
        values.update({f"finding_thresholds.{k}": v for k, v in settings.finding_thresholds.items()})
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"user_config: {name} must be a number in [0, 1], got {value!r}")
        for role, heads in settings.temperatures.items():
            for head, value in heads.items():
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                    what = f"temperatures.{role}.{head}"
                    raise ValueError(f"user_config: {what} must be a positive number, got {value!r}")
        return settings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_body(status: int, reason: str, detail: str) -> dict[str, Any]:
    return {"error": {"status": status, "reason": reason, "detail": detail}}


def head_answer(space: LabelSpace, probs: np.ndarray, settings: GateSettings) -> dict[str, Any]:
    """One head's part of a prediction: its probabilities by class, then

    - multi-label: ``findings``, the classes at or above their threshold (``finding_thresholds`` by class name, else
      ``finding_threshold``); multi-class: ``top_class`` and ``top_probability``;
    - ``binary``: the head's derived yes/no answer (``LabelSpace.binary``), or null for heads without one:
      ``{"name", "probability", "positive"}``; positive when a finding is reported (multi-label) or when the
      probability of the non-negative classes is at least ``BINARY_CUTOFF`` (multi-class).
    """
    values = [float(p) for p in np.asarray(probs).ravel()]
    answer: dict[str, Any] = {
        "multi_label": space.multi_label,
        "probabilities": dict(zip(space.classes, values, strict=True)),
    }
    if space.multi_label:
        cutoff = {name: settings.finding_thresholds.get(name, settings.finding_threshold) for name in space.classes}
        answer["findings"] = [name for name, p in zip(space.classes, values, strict=True) if p >= cutoff[name]]
    else:
        top = int(np.argmax(values))
        answer["top_class"], answer["top_probability"] = space.classes[top], values[top]
    answer["binary"] = None
    if space.binary is not None:
        probability = float(space.binary_probability(np.asarray(values)))
        positive = bool(answer["findings"]) if space.multi_label else probability >= BINARY_CUTOFF
        answer["binary"] = {"name": space.binary, "probability": probability, "positive": positive}
    return answer


def prediction_body(
    probs: dict[str, np.ndarray], spaces: Sequence[LabelSpace], settings: GateSettings
) -> dict[str, Any]:
    """``heads`` (the model's heads, in order), one ``head_answer`` per head under its name, and the confidence over
    every head (``models.ensemble.confidence``)."""
    spaces = [space for space in spaces if space.head in probs]
    conf = confidence({space.head: np.asarray(probs[space.head])[None] for space in spaces}, by_head(spaces))
    return {
        "heads": [space.head for space in spaces],
        **{space.head: head_answer(space, probs[space.head], settings) for space in spaces},
        "confidence": float(conf[0]),
    }
