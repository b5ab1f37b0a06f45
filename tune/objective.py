"""What the ensemble sweep maximises: quality of the gated ensemble, against how often it pays for the ViT.

- quality = the weighted mean over heads of each head's main figure (macro AUROC for a multi-label head, macro F1
  for a multi-class one), weights from ``tune.ensemble.head_weights`` (a head not named weighs 1.0); each image is
  scored and gated on the head of its own dataset; NaN parts (a head without rows) are left out, as in the
  training score.
- ``constrained``: quality, for points whose ViT fraction is at most ``max_vit_fraction``; infeasible points
  score below every feasible one (-1 minus how far over they are), so the search still has a slope to climb.
- ``tradeoff``: quality - ``vit_cost`` * ViT fraction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.ensemble import adaptive
from models.labels import LabelSpace, by_head
from pipelines.config import EnsembleTuneConfig
from pipelines.evaluate.metrics import headline, main_key, scored_heads


def quality(figures: Mapping[str, float], spaces: Sequence[LabelSpace], head_weights: Mapping[str, float]) -> float:
    """Weighted mean of every head's main figure (``metrics.main_key``); NaN figures are left out."""
    parts = [(head_weights.get(space.head, 1.0), figures[main_key(space)]) for space in spaces]
    parts = [(w, v) for w, v in parts if not math.isnan(v)]
    total = sum(w for w, _ in parts)
    return sum(w * v for w, v in parts) / total if total else math.nan


def quality_label(spaces: Sequence[LabelSpace], head_weights: Mapping[str, float]) -> str:
    """The quality in words, for plots: ``mean of nih14 AUROC, covid F1`` or ``2 x nih14 AUROC + 1 x covid F1``."""
    names = [f"{space.head} {'AUROC' if space.multi_label else 'F1'}" for space in spaces]
    weights = [head_weights.get(space.head, 1.0) for space in spaces]
    if len(set(weights)) <= 1:
        return "mean of " + ", ".join(names)
    return "weighted mean of " + " + ".join(f"{w:g} x {name}" for w, name in zip(weights, names, strict=True))


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
    spaces: Sequence[LabelSpace],
    settings: EnsembleTuneConfig,
) -> dict[str, Any]:
    """The gated ensemble at one (w_cnn, threshold) on predictions where both models answered every image: the
    headline figures of every head (``metrics.headline``, less its unweighted score), quality, ViT fraction,
    feasibility and the objective."""
    heads = [space.head for space in spaces]
    gated, used_vit = adaptive(
        {h: cnn[h] for h in heads},
        {h: vit[h] for h in heads},
        by_head(spaces),
        w_cnn,
        threshold,
        scored_heads(cnn, spaces),
    )
    figures = headline({**cnn, **gated}, spaces)
    figures.pop("score", None)
    q = quality(figures, spaces, settings.head_weights)
    fraction = float(used_vit.mean()) if len(used_vit) else 0.0
    return {
        **figures,
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
    spaces: Sequence[LabelSpace],
    settings: EnsembleTuneConfig,
) -> dict[str, dict[str, Any]]:
    """The chosen point beside CNN-only (a gate that never opens) and always-ensemble (a gate always open)."""
    return {
        "cnn_only": evaluate_point(cnn, vit, 1.0, 0.0, spaces, settings),
        "always_ensemble": evaluate_point(cnn, vit, w_cnn, math.inf, spaces, settings),
        "adaptive": evaluate_point(cnn, vit, w_cnn, threshold, spaces, settings),
    }
