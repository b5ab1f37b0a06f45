"""Figures per patient subgroup: does the model work equally for women and men, every age band, AP and PA films?

For each multi-label head (NIH's findings), on its own source's test rows: the macro AUROC and every finding's AUROC
within each group of ``sex`` (F, M), age band and ``view_position`` (AP, PA), read from the test shards in row order.
A group gets figures from ``MIN_GROUP_IMAGES`` images on, a finding from ``MIN_POSITIVES`` positives and as many
negatives in the group. Per finding: the best and worst group and their gap; a group is flagged where its AUROC is
more than ``FLAG_BELOW`` under the head's overall figure (anchor: Seyyed-Kalantari et al., Nature Medicine 2021,
who found CXR classifiers underdiagnose some groups). Small test sets make these gaps noisy: read a flag next to
the bootstrap interval of the overall figure, not as a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from models.labels import LabelSpace, label_key
from pipelines.evaluate.metrics import multilabel_auroc

AGE_BANDS = (
    (0, 18, "age 0-17"), (18, 40, "age 18-39"), (40, 60, "age 40-59"), (60, 80, "age 60-79"), (80, 200, "age 80+"),
)  # fmt: skip
FIELDS = ("sex", "age", "view_position")
MIN_GROUP_IMAGES = 20
MIN_POSITIVES = 3
FLAG_BELOW = 0.05


def subgroup_fields(files: Sequence[str]) -> dict[str, list]:
    """``sex``, ``age`` and ``view_position`` of every test row, in shard order (None where a source has none)."""
    table = pq.read_table(list(files), columns=list(FIELDS))
    return {field: table.column(field).to_pylist() for field in FIELDS}


def group_masks(fields: dict[str, list]) -> dict[str, np.ndarray]:
    """Group name -> boolean row mask, for every group some row belongs to."""
    masks = {}
    for name, value in (("sex", "F"), ("sex", "M"), ("view_position", "AP"), ("view_position", "PA")):
        masks[f"{name.replace('_position', '')} {value}"] = np.array([v == value for v in fields[name]], bool)
    ages = np.array([math.nan if a is None else float(a) for a in fields["age"]])
    for low, high, label in AGE_BANDS:
        masks[label] = (ages >= low) & (ages < high)
    return {name: mask for name, mask in masks.items() if mask.any()}


def _finding_auroc(labels: np.ndarray, probs: np.ndarray, space: LabelSpace) -> dict[str, float]:
    """Per-finding AUROC where the rows hold enough positives and negatives, NaN elsewhere."""
    found = multilabel_auroc(space, labels, probs)["per_finding"]
    positives, negatives = labels.sum(axis=0), len(labels) - labels.sum(axis=0)
    enough = (positives >= MIN_POSITIVES) & (negatives >= MIN_POSITIVES)
    return {name: value if enough[k] else math.nan for k, (name, value) in enumerate(found.items())}


def subgroup_metrics(pred: dict[str, np.ndarray], spaces: Sequence[LabelSpace], fields: dict[str, list]) -> dict:
    """Per multi-label head: ``overall`` (macro, per finding), ``groups`` (images, macro, per finding, flagged), and
    ``findings`` (best and worst group, gap)."""
    masks = group_masks(fields)
    result: dict[str, Any] = {}
    for index, space in enumerate(spaces):
        if not space.multi_label:
            continue
        own = pred["source"] == index
        labels, probs = pred[label_key(space.head)], pred[space.head]
        overall = _finding_auroc(labels[own], probs[own], space)
        overall_macro = _macro(overall)
        groups = {}
        for name, mask in masks.items():
            rows = own & mask
            if rows.sum() < MIN_GROUP_IMAGES:
                continue
            per_finding = _finding_auroc(labels[rows], probs[rows], space)
            macro = _macro(per_finding)
            flagged = [f for f, v in per_finding.items() if not math.isnan(v) and v < overall[f] - FLAG_BELOW]
            if not math.isnan(macro) and macro < overall_macro - FLAG_BELOW:
                flagged.insert(0, "macro")
            groups[name] = {"images": int(rows.sum()), "macro": macro, "per_finding": per_finding, "flagged": flagged}
        result[space.head] = {
            "overall": {"macro": overall_macro, "per_finding": overall},
            "groups": groups,
            "findings": _gaps(space, groups),
        }
    return result


def _macro(per_finding: dict[str, float]) -> float:
    defined = [v for v in per_finding.values() if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _gaps(space: LabelSpace, groups: dict[str, dict]) -> dict[str, dict]:
    """Per finding: the best and the worst group (among those with a figure) and the gap between them."""
    gaps = {}
    for finding in space.classes:
        values = {g: v["per_finding"][finding] for g, v in groups.items() if not math.isnan(v["per_finding"][finding])}
        if len(values) < 2:
            continue
        worst = min(values, key=values.get)
        best = max((group for group in values if group != worst), key=values.get)  # ties: two distinct groups
        gaps[finding] = {"best": best, "worst": worst, "gap": values[best] - values[worst]}
    return gaps
