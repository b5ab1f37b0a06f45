"""Per-subgroup figures (``pipelines/evaluate/subgroups.py``): groups from the shards' fields, a group the model
serves worse is flagged, small groups and rare findings are left out, and the report's section."""

from __future__ import annotations

import math

import numpy as np

from models.labels import label_key
from pipelines.evaluate.report import subgroup_section
from pipelines.evaluate.subgroups import MIN_GROUP_IMAGES, group_masks, subgroup_metrics
from tests.helpers import SPACES

NIH = next(i for i, space in enumerate(SPACES) if space.multi_label)


def _nih_predictions(n: int, seed: int = 0) -> tuple[dict, dict]:
    """NIH rows whose probabilities follow the labels closely for men and barely for women; fields per row."""
    rng = np.random.default_rng(seed)
    space = SPACES[NIH]
    k = len(space.classes)
    sex = np.where(np.arange(n) % 2 == 0, "M", "F")
    labels = (rng.random((n, k)) < 0.3).astype(np.int64)
    signal = np.where(sex == "M", 0.8, 0.1)[:, None]
    probs = np.clip(signal * labels + (1 - signal) * rng.random((n, k)), 0, 1)
    pred = {"source": np.full(n, NIH), space.head: probs, label_key(space.head): labels}
    for other in SPACES:  # the other heads' columns exist, as in evaluation; no rows of theirs here
        if other.head not in pred:
            pred[other.head] = np.zeros((n, len(other.classes)))
            shape = (n, len(other.classes)) if other.multi_label else (n,)
            pred[label_key(other.head)] = np.zeros(shape, np.int64)
    ages = rng.integers(20, 70, n).tolist()
    ages[:3] = [None, None, 85]  # missing ages, and one 80+ patient: a group too small for figures
    fields = {"sex": sex.tolist(), "age": ages, "view_position": ["PA" if i % 3 else "AP" for i in range(n)]}
    return pred, fields


def test_groups_come_from_the_fields():
    fields = {"sex": ["F", "M", None], "age": [17, 45, None], "view_position": ["AP", "PA", None]}
    masks = group_masks(fields)
    assert masks["sex F"].tolist() == [True, False, False] and masks["view PA"].tolist() == [False, True, False]
    assert masks["age 0-17"].tolist() == [True, False, False] and masks["age 40-59"].tolist() == [False, True, False]
    assert "age 80+" not in masks  # no row in it


def test_the_group_the_model_serves_worse_is_flagged():
    pred, fields = _nih_predictions(400)
    found = subgroup_metrics(pred, SPACES, fields)[SPACES[NIH].head]
    groups = found["groups"]
    assert groups["sex F"]["macro"] < found["overall"]["macro"] - 0.05 < groups["sex M"]["macro"]
    assert groups["sex F"]["flagged"][0] == "macro" and groups["sex M"]["flagged"] == []
    assert "age 80+" not in groups and all(g["images"] >= MIN_GROUP_IMAGES for g in groups.values())
    gap = found["findings"][SPACES[NIH].classes[0]]
    assert (gap["worst"], gap["best"]) == ("sex F", "sex M") and gap["gap"] > 0.2
    assert not any(math.isnan(v) for v in found["overall"]["per_finding"].values())


def test_the_report_section_lists_groups_and_gaps():
    pred, fields = _nih_predictions(400)
    text = "\n".join(subgroup_section(subgroup_metrics(pred, SPACES, fields), "adaptive"))
    assert "## Subgroups (adaptive)" in text and f"### `{SPACES[NIH].head}` by group" in text
    assert "| sex F | 200 |" in text and "| finding | worst group | best group | AUROC gap |" in text
