"""95% bootstrap confidence intervals of the evaluation report's figures, resampling patients rather than images.

Images of one patient are not independent (an NIH patient has up to 184 test images), so a replicate draws each
source's test patients with replacement and keeps every image of a drawn patient, as often as it was drawn; the
interval is the percentile range of a figure over the replicates. Patients are keyed ``<source>/<patient_id>`` from
the test shards (ingest stores ``patient_id`` with every row; a source without one counts each image as a patient).
Drawing within each source keeps every head's test set near its size.

Figures (``figure_values``): the headline keys of ``metrics.headline`` (macro AUROC, accuracy, macro F1, binary
AUROC per head, the score), each multi-label class's AUROC (``<head>/<class>_auroc``) and each head's ECE
(``<head>_ece``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq

from models.labels import LabelSpace
from pipelines.evaluate.metrics import head_calibration, head_metrics, headline

LEVEL = 0.95


def patient_groups(files: Sequence[str]) -> np.ndarray:
    """One integer per test row, in shard order (the order evaluation predicts in): the row's patient."""
    table = pq.read_table(list(files), columns=["source", "patient_id"])
    sources = table.column("source").to_pylist()
    patients = table.column("patient_id").to_pylist()
    pairs = enumerate(zip(sources, patients, strict=True))
    keys = [f"{s}/{p}" if p not in (None, "") else f"{s}/#{i}" for i, (s, p) in pairs]
    _, groups = np.unique(np.array(keys, dtype=object), return_inverse=True)
    return groups.astype(np.int64)


def figure_values(pred: dict[str, np.ndarray], spaces: Sequence[LabelSpace]) -> dict[str, float]:
    """Every figure the report gives an interval, by key (see the module docstring)."""
    heads = {space.head: head_metrics(space, pred, index) for index, space in enumerate(spaces)}
    values = dict(headline(pred, spaces, heads))
    for index, space in enumerate(spaces):
        values[f"{space.head}_ece"] = head_calibration(space, pred, index)["ece"]
        if space.multi_label:
            per_finding = heads[space.head].get("per_finding") or {}
            values |= {f"{space.head}/{name}_auroc": value for name, value in per_finding.items()}
    return values


def resample(groups: np.ndarray, strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one replicate: within each stratum (source), its patients drawn with replacement, each drawn
    patient's rows taken whole."""
    order = np.argsort(groups, kind="stable")
    starts = np.searchsorted(groups[order], np.arange(groups.max() + 1))
    ends = np.append(starts[1:], len(groups))
    rows = []
    for stratum in np.unique(strata):
        members = np.unique(groups[strata == stratum])
        for patient in rng.choice(members, size=len(members), replace=True):
            rows.append(order[starts[patient] : ends[patient]])
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def bootstrap_intervals(
    pred: dict[str, np.ndarray],
    spaces: Sequence[LabelSpace],
    groups: np.ndarray,
    replicates: int,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, tuple[float, float]]:
    """``key -> (low, high)`` over ``replicates`` patient-level replicates of ``pred`` (one system's predictions,
    with ``source`` and the label columns). A figure NaN in too many replicates (a class absent from most draws)
    gets (NaN, NaN)."""
    rows = len(pred["source"])
    if len(groups) != rows:
        raise ValueError(f"{len(groups)} patient ids for {rows} predicted rows: the test shards changed under them")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(replicates):
        take = resample(groups, pred["source"], rng)
        for key, value in figure_values({k: v[take] for k, v in pred.items()}, spaces).items():
            draws.setdefault(key, []).append(value)
    tail = (1.0 - level) / 2 * 100
    intervals = {}
    for key, values in draws.items():
        found = np.array([v for v in values if not math.isnan(v)])
        if len(found) < 0.9 * replicates:
            intervals[key] = (math.nan, math.nan)
        else:
            intervals[key] = (float(np.percentile(found, tail)), float(np.percentile(found, 100 - tail)))
    return intervals
