"""Referring the least confident answers (``models.ensemble.refer_floor``, ``pipelines/evaluate/referral.py``): the
floor leaves the asked-for share answered, and quality rises as coverage falls when confidence means something."""

from __future__ import annotations

import numpy as np
import pytest

from models.ensemble import refer_floor
from models.labels import label_key
from pipelines.evaluate.referral import COVERAGES, risk_coverage
from tests.helpers import SPACES

COVID = next(i for i, space in enumerate(SPACES) if space.head == "covid")


def test_the_floor_leaves_the_coverage_answered():
    confidences = np.linspace(0.3, 1.0, 1000)
    floor = refer_floor(confidences, 0.9)
    assert np.mean(confidences >= floor) == pytest.approx(0.9, abs=0.002)
    assert refer_floor(confidences, 1.0) == 0.0  # never refer


def test_quality_rises_as_the_least_confident_answers_are_referred():
    """Confident covid answers are right, unsure ones a coin toss: accuracy climbs as coverage falls."""
    rng = np.random.default_rng(0)
    space, n = SPACES[COVID], 400
    k = len(space.classes)
    labels = rng.integers(0, k, n)
    sure = rng.random(n) < 0.6
    guess = np.where(sure, labels, rng.integers(0, k, n))
    probs = np.full((n, k), 0.0)
    probs[np.arange(n), guess] = np.where(sure, 0.95, 0.4)
    probs += (1 - probs.sum(axis=1, keepdims=True)) / k
    pred = {"source": np.full(n, COVID), space.head: probs, label_key(space.head): labels}
    for other in SPACES:
        if other.head != space.head:
            pred[other.head] = np.zeros((n, len(other.classes)))
            pred[label_key(other.head)] = np.zeros((n, len(other.classes)) if other.multi_label else n, np.int64)
    found = risk_coverage(pred, SPACES, refer_below=0.9)["covid"]
    points = [found["points"][c] for c in COVERAGES]
    assert found["figure"] == "accuracy" and points[0] < points[2] < points[-1] == pytest.approx(1.0)
    assert found["at_floor"]["coverage"] == pytest.approx(sure.mean()) and found["at_floor"]["figure"] == 1.0
    assert set(risk_coverage(pred, SPACES, 0.9)) == {"covid"}  # heads without rows are left out
