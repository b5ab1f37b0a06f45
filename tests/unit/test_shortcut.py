"""The shortcut check (``pipelines/evaluate/shortcut.py``): the source probe flags images that carry a source tag
and not the same images without it; confident calls on other sources are counted as the label spaces say."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.checkpoint import model_from_checkpoint
from models.labels import label_key
from pipelines.config import load_config
from pipelines.data.synth.render import burn_marker, render_image
from pipelines.evaluate import shortcut
from pipelines.evaluate.inference import predict_local
from tests.helpers import CONFIG, SPACES, encode_png, tiny_checkpoint

SIZE = 64
HEALTHY = 40  # healthy images per source (NIH "No Finding", COVID "Normal")
SICK = 6  # images with a finding per source: in the all-images probe, not in the healthy one


def _rows() -> list[tuple[str, tuple[str, ...], list[int]]]:
    """(source, findings to paint, shard labels) of the test images: two adult sources, healthy and sick."""
    effusion = [int(name == "Effusion") for name in SPACES[0].classes]
    rows = [("nih", (), [0] * len(SPACES[0].classes))] * HEALTHY + [("nih", ("Effusion",), effusion)] * SICK
    normal, covid = SPACES[1].class_index("Normal"), SPACES[1].class_index("COVID")
    return rows + [("covid", ("Normal",), [normal])] * HEALTHY + [("covid", ("COVID",), [covid])] * SICK


def _write_shards(folder, marker: bool) -> list[str]:
    images, sources, labels = [], [], []
    for k, (source, findings, label) in enumerate(_rows()):
        pixels = render_image(7, source, k, k, findings, SIZE)
        pixels = burn_marker(pixels, source) if marker else pixels
        images.append(encode_png(np.round(pixels * 255).astype(np.uint8)))
        sources.append(source)
        labels.append(label)
    table = pa.table({
        "image": pa.array(images, pa.binary()), "source": sources, "labels": pa.array(labels, pa.list_(pa.int64())),
        "age": pa.array([None] * len(images), pa.int64()), "sex": pa.array([None] * len(images), pa.string()),
        "view_position": pa.array([None] * len(images), pa.string()),
    })  # fmt: skip
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "shard-00000.parquet", row_group_size=32)
    return [str(folder / "shard-00000.parquet")]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """The check of one random-initialised tiny CNN on the same images without and with the source tag."""
    root = tmp_path_factory.mktemp("shortcut")
    torch.manual_seed(0)
    model = model_from_checkpoint(tiny_checkpoint(root, "cnn", "test_efficientnet", size=SIZE))
    cfg = load_config(CONFIG, "demo", [])
    results = {}
    for marker in (False, True):
        files = _write_shards(root / f"marker-{marker}", marker)
        preds = predict_local(model, cfg, files)
        results[marker] = shortcut.shortcut_check(model, cfg, files, preds, model.label_spaces)
    return results


def test_features_line_up_with_the_predictions_rows(tmp_path):
    torch.manual_seed(0)
    model = model_from_checkpoint(tiny_checkpoint(tmp_path, "cnn", "test_efficientnet", size=SIZE))
    cfg = load_config(CONFIG, "demo", ["evaluate.batch_size=5"])
    files = _write_shards(tmp_path / "shards", marker=False)
    features, source = shortcut.pooled_features(model, cfg, files)
    assert features.dtype == np.float32 and features.shape == (len(_rows()), model.backbone.num_features)
    assert np.array_equal(source, predict_local(model, cfg, files)["source"])
    with pytest.raises(ValueError, match="line up"):
        shortcut.shortcut_check(model, cfg, files, {"source": source[::-1]}, model.label_spaces)


def test_the_tag_is_flagged_and_the_untagged_images_are_not(checked):
    plain, tagged = checked[False], checked[True]
    for result in (plain, tagged):
        assert result["probe_healthy"]["rows"] == {"nih": HEALTHY, "covid": HEALTHY}
        assert result["probe_all"]["rows"] == {"nih": HEALTHY + SICK, "covid": HEALTHY + SICK}
        json.dumps(result)  # goes into the evaluation's JSON as it is
    assert tagged["probe_healthy"]["min_pair"]["auroc"] >= 0.9 and tagged["flagged"]
    assert plain["probe_healthy"]["min_pair"]["auroc"] <= 0.7 and not plain["flagged"]
    assert "may be reading the source" in tagged["reading"] and "only weakly" in plain["reading"]


def test_report_section_is_a_markdown_table_and_the_reading(checked):
    lines = shortcut.report_section(checked[True])
    assert lines[:2] == ["", "## Shortcut check"] and checked[True]["reading"] in lines
    table = [line for line in lines if line.startswith("| no finding")]
    assert len(table) == 1 and "nih 40, covid 40" in table[0]
    header = next(line for line in lines if line.startswith("| images"))
    assert header.count("|") == table[0].count("|")


def test_probe_skips_a_source_with_too_few_rows_and_needs_two():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 8)).astype(np.float32)
    source = np.array([0] * 25 + [1] * 20 + [2] * 5)
    result = shortcut.source_probe(features, source, ["nih", "covid", "pneumonia"])
    assert result["skipped"] == ["pneumonia"] and list(result["pairs"]) == ["nih vs covid"]
    assert 0.2 < result["auroc"] < 0.8  # noise: no signal
    alone = shortcut.source_probe(features[:30], source[:30], ["nih", "covid", "pneumonia"])
    assert alone["auroc"] is None and alone["min_pair"] is None and alone["skipped"] == ["covid"]


def _hand_made_preds() -> dict[str, np.ndarray]:
    """Four NIH rows (two healthy), two COVID-DB rows (one Normal), two pneumonia rows (one normal)."""
    nih, covid, pneumonia = SPACES
    source = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = {"source": source, "nih14": np.full((8, len(nih.classes)), 0.1)}
    preds[label_key("nih14")] = np.zeros((8, len(nih.classes)), np.float32)
    preds[label_key("nih14")][[2, 3], 0] = 1
    p_covid = np.full((8, len(covid.classes)), 0.0)
    p_covid[:, covid.class_index("Normal")] = 1.0
    p_covid[[0, 2, 7], covid.class_index("COVID")], p_covid[[0, 2, 7], covid.class_index("Normal")] = 0.95, 0.05
    p_pneu = np.zeros((8, len(pneumonia.classes)))
    p_pneu[:, pneumonia.class_index("normal")] = 1.0
    # rows 1 (NIH, healthy) and 5 (COVID-DB) split 0.5/0.45 over bacterial/viral: 0.95 pneumonia, no class >= 0.9
    for row in (1, 5):
        p_pneu[row] = 0.0
        p_pneu[row, pneumonia.class_index("bacterial")], p_pneu[row, pneumonia.class_index("viral")] = 0.5, 0.45
        p_pneu[row, pneumonia.class_index("normal")] = 0.05
    preds |= {"covid": p_covid, "pneumonia": p_pneu}
    preds[label_key("covid")] = np.array([-1, -1, -1, -1, covid.class_index("Normal"), covid.class_index("COVID"),
                                          -1, -1])  # fmt: skip
    preds[label_key("pneumonia")] = np.array([-1] * 6 + [pneumonia.class_index("normal"), 1])
    return preds


def test_confident_calls_on_other_sources_use_the_class_names():
    preds = _hand_made_preds()
    assert shortcut.healthy_rows(preds, SPACES).tolist() == [True, True, False, False, True, False, True, False]
    calls = {(c["head"], c["source"]): c for c in shortcut.confident_calls(preds, SPACES, confidence=0.9)}
    assert set(calls) == {("covid", "nih"), ("covid", "pneumonia"), ("pneumonia", "nih"), ("pneumonia", "covid")}
    assert calls["covid", "nih"] == {"head": "covid", "called": "COVID", "source": "nih", "rows": 4,
                                    "rate": 0.5, "healthy_rows": 2, "healthy_rate": 0.5}  # fmt: skip
    assert calls["covid", "pneumonia"]["rate"] == 0.5 and calls["covid", "pneumonia"]["healthy_rate"] == 0.0
    assert calls["pneumonia", "nih"]["called"] == "bacterial+viral"
    assert calls["pneumonia", "nih"]["rate"] == 0.25 and calls["pneumonia", "nih"]["healthy_rate"] == 0.5
    assert calls["pneumonia", "covid"]["rate"] == 0.5 and calls["pneumonia", "covid"]["healthy_rate"] == 0.0
    strict = {(c["head"], c["source"]): c["rate"] for c in shortcut.confident_calls(preds, SPACES, confidence=0.99)}
    assert strict["pneumonia", "nih"] == 0.0 and strict["covid", "nih"] == 0.0


def test_an_absent_head_is_skipped():
    preds = _hand_made_preds()
    del preds["pneumonia"], preds[label_key("pneumonia")]
    calls = shortcut.confident_calls(preds, SPACES)
    assert {c["head"] for c in calls} == {"covid"} and {c["source"] for c in calls} == {"nih", "pneumonia"}
