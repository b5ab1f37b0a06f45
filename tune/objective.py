"""What the ensemble sweep maximises: quality of the gated ensemble, against how often it pays for the ViT.

- quality = ``nih_weight`` * nih14 macro AUROC + (1 - ``nih_weight``) * covid macro F1, each image scored on the
  head of its own dataset (NaN parts are left out, as in the training score).
- ``constrained``: quality, for points whose ViT fraction is at most ``max_vit_fraction``; infeasible points
  score below every feasible one (-1 minus how far over they are), so the search still has a slope to climb.
- ``tradeoff``: quality - ``vit_cost`` * ViT fraction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.ensemble import adaptive
from pipelines.config import EnsembleTuneConfig
from pipelines.evaluate.metrics import headline, scored_heads

HEADS = ("nih14", "covid")


def quality(figures: Mapping[str, float], nih_weight: float) -> float:
    parts = [(nih_weight, figures["nih_macro_auroc"]), (1.0 - nih_weight, figures["covid_macro_f1"])]
    parts = [(w, v) for w, v in parts if not math.isnan(v)]
    total = sum(w for w, _ in parts)
    return sum(w * v for w, v in parts) / total if total else math.nan


def objective(quality_value: float, vit_fraction: float, settings: EnsembleTuneConfig) -> float:
    if settings.objective == "tradeoff":
        return quality_value - settings.vit_cost * vit_fraction
    excess = vit_fraction - settings.max_vit_fraction
    return quality_value if excess <= 1e-12 else -1.0 - excess


def evaluate_point(
    cnn: Mapping[str, np.ndarray],
    vit: Mapping[str, np.ndarray],
    w_cnn: float,
    threshold: float,
    covid_classes: tuple[str, ...],
    settings: EnsembleTuneConfig,
) -> dict[str, Any]:
    """The gated ensemble at one (w_cnn, threshold) on predictions where both models answered every image."""
    gated, used_vit = adaptive(
        {h: cnn[h] for h in HEADS}, {h: vit[h] for h in HEADS}, w_cnn, threshold, scored_heads(cnn)
    )
    figures = headline({**cnn, **gated}, covid_classes)
    q = quality(figures, settings.nih_weight)
    fraction = float(used_vit.mean()) if len(used_vit) else 0.0
    return {
        "nih_macro_auroc": figures["nih_macro_auroc"],
        "covid_accuracy": figures["covid_accuracy"],
        "covid_macro_f1": figures["covid_macro_f1"],
        "quality": q,
        "vit_fraction": fraction,
        "feasible": settings.objective == "tradeoff" or fraction <= settings.max_vit_fraction + 1e-12,
        "objective": objective(q, fraction, settings),
    }


def reference_points(
    cnn: Mapping[str, np.ndarray],
    vit: Mapping[str, np.ndarray],
    w_cnn: float,
    threshold: float,
    covid_classes: tuple[str, ...],
    settings: EnsembleTuneConfig,
) -> dict[str, dict[str, Any]]:
    """The chosen point beside CNN-only (a gate that never opens) and always-ensemble (a gate always open)."""
    return {
        "cnn_only": evaluate_point(cnn, vit, 1.0, 0.0, covid_classes, settings),
        "always_ensemble": evaluate_point(cnn, vit, w_cnn, math.inf, covid_classes, settings),
        "adaptive": evaluate_point(cnn, vit, w_cnn, threshold, covid_classes, settings),
    }
