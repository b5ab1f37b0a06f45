"""Patient-level bootstrap intervals (``pipelines/evaluate/uncertainty.py``): patients from the shards, replicates
that keep a patient's images together, intervals that cover the figure and narrow with more patients, and the
report's brackets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.labels import label_key
from pipelines.evaluate.report import summary_table
from pipelines.evaluate.uncertainty import bootstrap_intervals, figure_values, patient_groups, resample
from tests.helpers import SPACES


def _predictions(patients: int, images_per_patient: int, seed: int = 0, alike: bool = False) -> tuple[dict, np.ndarray]:
    """Every head's rows with informative probabilities and the patient ids to resample by. Each patient's images
    share its labels; with ``alike`` also its probabilities (films of one patient read alike: right or wrong
    together)."""
    rng = np.random.default_rng(seed)
    source = np.repeat(np.arange(patients) % len(SPACES), images_per_patient)
    groups = np.repeat(np.arange(patients), images_per_patient)
    n = len(source)
    pred: dict[str, np.ndarray] = {"source": source}
    for space in SPACES:
        k = len(space.classes)
        if space.multi_label:
            labels = (rng.random((patients, k)) < 0.3).astype(np.int64)[groups]
            noise = rng.random((patients, k))[groups] if alike else rng.random((n, k))
            probs = np.clip(0.35 * labels + 0.65 * noise, 0, 1)
        else:
            labels = rng.integers(0, k, patients)[groups]
            probs = rng.dirichlet(np.ones(k), patients)[groups] if alike else rng.dirichlet(np.ones(k), n)
            probs[np.arange(n), labels] += 0.6
            probs /= probs.sum(axis=1, keepdims=True)
        pred[space.head], pred[label_key(space.head)] = probs.astype(np.float32), labels
    return pred, groups


def test_patients_come_from_the_shards_in_row_order(tmp_path):
    rows = {"source": ["nih", "nih", "covid", "nih", "covid"], "patient_id": ["7", "8", "7", "7", None]}
    pq.write_table(pa.table({k: v[:3] for k, v in rows.items()}), tmp_path / "a.parquet")
    pq.write_table(pa.table({k: v[3:] for k, v in rows.items()}), tmp_path / "b.parquet")
    groups = patient_groups([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")])
    assert groups[0] == groups[3]  # nih/7 twice, across files
    assert len({groups[0], groups[1], groups[2], groups[4]}) == 4  # covid/7 is another patient; no id: its own


def test_a_replicate_keeps_each_drawn_patients_images_together():
    groups = np.repeat(np.arange(30), np.arange(1, 31))  # patient p has p + 1 images
    strata = groups % 3
    take = resample(groups, strata, np.random.default_rng(1))
    rows_per_patient = np.bincount(groups)
    drawn = np.bincount(groups[take], minlength=30)
    assert np.all(drawn % rows_per_patient == 0)  # whole patients, each as often as drawn
    for stratum in range(3):  # each source keeps its number of patients
        assert (drawn[np.arange(30) % 3 == stratum] // rows_per_patient[np.arange(30) % 3 == stratum]).sum() == 10


def test_intervals_cover_the_figure_and_narrow_with_more_patients():
    small, small_groups = _predictions(patients=60, images_per_patient=3)
    large, large_groups = _predictions(patients=600, images_per_patient=3)
    narrow = bootstrap_intervals(large, SPACES, large_groups, replicates=60, seed=2)
    wide = bootstrap_intervals(small, SPACES, small_groups, replicates=60, seed=2)
    values = figure_values(large, SPACES)
    for key in ("nih14_macro_auroc", "covid_accuracy", "pneumonia_macro_f1", "nih14_ece", "score"):
        low, high = narrow[key]
        assert low <= values[key] <= high, (key, values[key], narrow[key])
        assert high - low < wide[key][1] - wide[key][0], key
    finding = f"nih14/{SPACES[0].classes[0]}_auroc"
    assert finding in narrow and narrow[finding][0] < narrow[finding][1]


def test_resampling_patients_is_wider_than_resampling_images_when_a_patients_images_agree():
    pred, groups = _predictions(patients=120, images_per_patient=8, seed=3, alike=True)
    by_patient = bootstrap_intervals(pred, SPACES, groups, replicates=60, seed=4)["covid_accuracy"]
    by_image = bootstrap_intervals(pred, SPACES, np.arange(len(groups)), replicates=60, seed=4)["covid_accuracy"]
    assert by_patient[1] - by_patient[0] > by_image[1] - by_image[0]


def test_patient_ids_must_match_the_rows():
    pred, groups = _predictions(patients=12, images_per_patient=2)
    with pytest.raises(ValueError, match="23 patient ids for 24 predicted rows"):
        bootstrap_intervals(pred, SPACES, groups[:-1], replicates=2)


def test_the_summary_shows_each_figure_with_its_interval():
    pred, groups = _predictions(patients=90, images_per_patient=2)
    metrics = {"headline": figure_values(pred, SPACES)}
    with_ci = {**metrics, "intervals": bootstrap_intervals(pred, SPACES, groups, replicates=20)}
    table = "\n".join(summary_table({"cnn": with_ci, "probe": metrics}, SPACES))
    low, high = with_ci["intervals"]["score"]
    assert f"| cnn | {metrics['headline']['score']:.3f} [{low:.3f}, {high:.3f}] |" in table
    assert f"| probe | {metrics['headline']['score']:.3f} |" in table  # a row without intervals stays plain
