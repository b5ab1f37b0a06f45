"""The JSON the HTTP API answers with (version v1): predictions, errors and the live gate settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from models.ensemble import confidence
from models.labels import abnormal_probability

API_VERSION = "v1"
MODES = ("adaptive", "cnn", "vit", "ensemble")


@dataclass(frozen=True)
class GateSettings:
    """What ``user_config`` carries to the router; ``reconfigure`` swaps it without restarting any replica."""

    w_cnn: float
    threshold: float
    finding_threshold: float = 0.5
    finding_thresholds: dict[str, float] = field(default_factory=dict)
    source: str = "config"  # where w_cnn and threshold came from: an ensemble.yaml path or "config"
    tuned_for: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_user_config(cls, user_config: dict[str, Any]) -> GateSettings:
        known = {"w_cnn", "threshold", "finding_threshold", "finding_thresholds", "source", "tuned_for"}
        unknown = sorted(set(user_config) - known)
        if unknown:
            raise ValueError(f"user_config: unknown keys {unknown}; known: {sorted(known)}")
        settings = cls(**user_config)
        values = {name: getattr(settings, name) for name in ("w_cnn", "threshold", "finding_threshold")}
        values.update({f"finding_thresholds.{k}": v for k, v in settings.finding_thresholds.items()})
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"user_config: {name} must be a number in [0, 1], got {value!r}")
        return settings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_body(status: int, reason: str, detail: str) -> dict[str, Any]:
    return {"error": {"status": status, "reason": reason, "detail": detail}}


def prediction_body(
    probs: dict[str, np.ndarray], labels: dict[str, list[str]], settings: GateSettings
) -> dict[str, Any]:
    """Probabilities per head, the findings at or above their thresholds and the abnormal answer, the covid top
    class, and confidence."""
    nih = [float(p) for p in np.asarray(probs["nih14"]).ravel()]
    covid = [float(p) for p in np.asarray(probs["covid"]).ravel()]
    cutoffs = {name: settings.finding_thresholds.get(name, settings.finding_threshold) for name in labels["nih14"]}
    findings = [name for name, p in zip(labels["nih14"], nih, strict=True) if p >= cutoffs[name]]
    top = int(np.argmax(covid))
    conf = confidence({head: np.asarray(values)[None] for head, values in probs.items()})
    return {
        "nih14": {
            "probabilities": dict(zip(labels["nih14"], nih, strict=True)),
            "findings": findings,
            # the binary screening answer: abnormal when any finding is reported
            "abnormal": bool(findings),
            "abnormal_probability": float(abnormal_probability(np.asarray(nih))),
        },
        "covid": {
            "probabilities": dict(zip(labels["covid"], covid, strict=True)),
            "top_class": labels["covid"][top],
            "top_probability": covid[top],
        },
        "confidence": float(conf[0]),
    }
