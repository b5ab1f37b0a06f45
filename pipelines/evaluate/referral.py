"""Coverage against quality for the answers serving gives: what referring the least confident answers buys.

For each head, on its own source's test rows, the adaptive ensemble's answers are ranked by their confidence
(``LabelSpace.confidence``, what the gate and the referral floor read); keeping the most confident share (the
coverage) and referring the rest, the head's figure on the kept rows: accuracy for a multi-class head, macro AUROC
for a multi-label one. Also where stage B's floor (``refer_below`` in ensemble.yaml) lands on the test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.labels import LabelSpace
from pipelines.evaluate.metrics import head_metrics

COVERAGES = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)  # the report's table
CURVE = tuple(round(c, 2) for c in np.linspace(1.0, 0.3, 15))  # the report's plot, every 5%


def _figure(space: LabelSpace, pred: dict[str, np.ndarray], index: int) -> float:
    found = head_metrics(space, pred, index)
    return found.get("macro", math.nan) if space.multi_label else found.get("accuracy", math.nan)


def risk_coverage(pred: dict[str, np.ndarray], spaces: Sequence[LabelSpace], refer_below: float) -> dict[str, Any]:
    """Per head: ``figure`` (its name), ``points`` (coverage -> figure on the kept rows, at ``COVERAGES``), ``curve``
    (the same at ``CURVE``) and ``at_floor`` (the share of its test rows at or above ``refer_below`` and the figure
    there)."""
    result = {}
    for index, space in enumerate(spaces):
        own = np.flatnonzero(pred["source"] == index)
        if not len(own):
            continue
        conf = space.confidence(pred[space.head][own])
        order = own[np.argsort(-conf, kind="stable")]

        def kept(rows: np.ndarray) -> dict[str, np.ndarray]:
            mask = np.zeros(len(pred["source"]), bool)
            mask[rows] = True
            return {**pred, "source": np.where(mask, pred["source"], -1)}  # rows outside count for no head

        figures = {c: _figure(space, kept(order[: max(1, round(c * len(own)))]), index) for c in {*COVERAGES, *CURVE}}
        above = own[conf >= refer_below]
        result[space.head] = {
            "figure": "macro AUROC" if space.multi_label else "accuracy",
            "points": {c: figures[c] for c in COVERAGES},
            "curve": {c: figures[c] for c in CURVE},
            "at_floor": {"coverage": len(above) / len(own), "figure": _figure(space, kept(above), index)},
        }
    return result
