"""The Serve app's endpoints over HTTP: health, model info, each mode against the checkpoint computed in process,
the gate, DICOM, batches and `cxr serve --try` (the package's one app, see conftest.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from PIL import Image

from models.checkpoint import PreprocessSpec, model_from_checkpoint
from pipelines.data.datasets.nih import NIH14
from pipelines.data.imaging import decode_gray
from serve.preprocess import Preprocessor
from serve.replicas import probabilities
from tests.helpers import API_KEY, HEADERS, SPACES, make_dicom, png, post

HEADS = [space.head for space in SPACES]  # nih14, covid, pneumonia: the tiny checkpoints' heads

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_health_and_model_describe_both_models(served):
    health = requests.get(served["url"] + "/v1/health", timeout=10)
    assert health.status_code == 200 and health.json() == {
        "status": "ready",
        "models": {"cnn": "ready", "vit": "ready"},
    }
    info = requests.get(served["url"] + "/v1/model", headers=HEADERS, timeout=10).json()
    assert info["models"]["cnn"]["arch"] == "test_efficientnet" and info["models"]["vit"]["arch"] == "test_vit"
    assert info["models"]["cnn"]["checkpoint"] == str(served["checkpoints"]["cnn"])
    assert info["models"]["cnn"]["preprocessing"]["storage_size"] == 64
    assert info["models"]["cnn"]["label_spaces"] == [space.to_dict() for space in SPACES]
    assert info["ensemble"]["threshold"] == 0.85 and info["ensemble"]["w_cnn"] == 0.4


def test_cnn_mode_answers_what_the_checkpoint_computes_in_process(served):
    data = png(300, seed=1)
    answer = post(served, data=data, mode="cnn")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["models_used"] == ["cnn"] and body["mode"] == "cnn" and body["input"]["format"] == "png"
    model = model_from_checkpoint(served["checkpoints"]["cnn"])
    gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    expected = probabilities(model, Preprocessor(PreprocessSpec(64, 64))(gray)[None], "cpu")
    assert body["heads"] == HEADS
    for space in SPACES:
        answer = body[space.head]
        served_probs = np.array(list(answer["probabilities"].values()))
        assert list(answer["probabilities"]) == list(space.classes) and answer["multi_label"] == space.multi_label
        np.testing.assert_allclose(served_probs, expected[space.head][0], atol=1e-5)
        if space.multi_label:
            assert answer["findings"] == [k for k, v in answer["probabilities"].items() if v >= 0.5]
        else:
            assert answer["top_class"] == space.classes[int(np.argmax(served_probs))]
        if space.binary is None:
            assert answer["binary"] is None
            continue
        binary = answer["binary"]
        assert binary["name"] == space.binary
        assert binary["probability"] == pytest.approx(float(space.binary_probability(served_probs)), abs=1e-6)
    nih, pneumonia = body["nih14"], body["pneumonia"]
    assert nih["binary"]["positive"] == bool(nih["findings"])  # abnormal: a finding is reported
    assert nih["binary"]["probability"] == pytest.approx(max(nih["probabilities"].values()), abs=1e-6)
    assert pneumonia["binary"]["positive"] == (pneumonia["binary"]["probability"] >= 0.5)


@pytest.mark.parametrize(("mode", "used"), [("vit", ["vit"]), ("ensemble", ["cnn", "vit"])])
def test_forced_modes(served, mode, used):
    body = post(served, files={"file": ("x.png", png(seed=2))}, mode=mode).json()
    assert body["models_used"] == used and body["mode"] == mode
    assert abs(sum(body["covid"]["probabilities"].values()) - 1.0) < 1e-4
    assert abs(sum(body["pneumonia"]["probabilities"].values()) - 1.0) < 1e-4
    assert set(body["model_versions"]) == set(used)


def test_ensemble_is_the_weighted_mean_of_both_models(served):
    data = png(seed=3)
    cnn, vit, fused = (post(served, data=data, mode=m).json() for m in ("cnn", "vit", "ensemble"))
    for head in HEADS:
        for name, value in fused[head]["probabilities"].items():
            expected = 0.4 * cnn[head]["probabilities"][name] + 0.6 * vit[head]["probabilities"][name]
            assert value == pytest.approx(expected, abs=1e-5)


def test_adaptive_gate_uses_the_configured_threshold(served):
    body = post(served, data=png(seed=4)).json()
    assert body["mode"] == "adaptive" and body["gate"]["threshold"] == 0.85
    escalated = body["cnn_confidence"] < 0.85
    assert body["gate"]["escalated"] == escalated
    assert body["models_used"] == (["cnn", "vit"] if escalated else ["cnn"])


@pytest.mark.parametrize("head", ["covid", "pneumonia"])
def test_gate_scores_only_the_head_the_caller_reads(served, head):
    """`?head=covid` / `?head=pneumonia`: the gate sees that head's confidence (its top probability), as tuning
    scores an image of its dataset; every head is still answered. Without `head`, the lowest over all heads."""
    every = post(served, data=png(seed=5), mode="cnn").json()
    one = requests.post(
        served["url"] + "/v1/predict", params={"head": head}, data=png(seed=5), headers=HEADERS, timeout=60
    ).json()
    nih_conf = min(max(p, 1 - p) for p in every["nih14"]["probabilities"].values())
    tops = {h: every[h]["top_probability"] for h in ("covid", "pneumonia")}
    assert every["gate"]["heads"] == HEADS
    assert every["cnn_confidence"] == pytest.approx(min(nih_conf, *tops.values()), abs=1e-6)
    assert one["cnn_confidence"] == pytest.approx(tops[head], abs=1e-6) and one["gate"]["heads"] == [head]
    assert one["gate"]["escalated"] == (tops[head] < 0.85) and set(one["nih14"]["probabilities"]) == set(NIH14)
    assert one["heads"] == HEADS and one["pneumonia"]["binary"]["name"] == "pneumonia"


def test_an_unknown_head_is_refused_naming_the_models_heads(served):
    url = served["url"] + "/v1/predict"
    bad = requests.post(url, params={"head": "lungs"}, data=png(), headers=HEADERS, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["reason"] == "bad_head"
    assert "(nih14, covid, pneumonia), got 'lungs'" in bad.json()["error"]["detail"]


def test_dicom_upload(served):
    # a radiograph stored inverted, as MONOCHROME1 says: the router turns it back (else the OOD check refuses it)
    pixels = (255 - decode_gray(png(128, seed=40))[0]).astype(np.uint16) * 16
    body = post(served, data=make_dicom(pixels, modality="CR", photometric="MONOCHROME1"), mode="cnn").json()
    assert body["input"] == {"format": "dicom", "width": 128, "height": 128}


def test_batch_answers_each_image_in_order(served):
    files = [
        ("files", ("a.png", png(seed=5))),
        ("files", ("b.txt", b"not an image")),
        ("files", ("c.dcm", make_dicom(np.ones((64, 64), np.uint16), modality="CT"))),
        ("files", ("d.png", png(seed=6)[:300])),
    ]
    answer = post(served, files=files, path="/v1/predict/batch", mode="cnn")
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["filename"] for r in results] == ["a.png", "b.txt", "c.dcm", "d.png"]
    assert [r["status"] for r in results] == [200, 415, 415, 400]
    assert results[0]["models_used"] == ["cnn"]
    assert results[2]["error"]["reason"] == "modality_not_allowed"


def test_batch_limits(served):
    too_many = [("files", (f"{i}.png", png(32, seed=i))) for i in range(5)]
    answer = post(served, files=too_many, path="/v1/predict/batch")
    assert answer.status_code == 413 and answer.json()["error"]["reason"] == "too_many_images"
    raw = post(served, data=png(), path="/v1/predict/batch")
    assert raw.status_code == 400 and raw.json()["error"]["reason"] == "expected_multipart"


def test_try_sends_test_split_files_and_prints_one_line_each(served, shards_config, capsys):
    """`cxr serve --try N` (the demo's last step): original test-split files from ingest's folders, over HTTP."""
    import pyarrow.parquet as pq

    from pipelines.data.shards import manifest_label_spaces, shard_files
    from serve.smoke import pick_test_images, try_images

    cfg = shards_config
    samples = pick_test_images(cfg, 4)
    present = set(pq.read_table(shard_files(cfg.data.shards_dir, "test"), columns=["source"])["source"].to_pylist())
    # the datasets with test rows take turns, in head order
    sources = [space.source for space in manifest_label_spaces(cfg.data.shards_dir) if space.source in present]
    assert [s.source for s in samples] == [sources[i % len(sources)] for i in range(4)]
    assert all(s.path.is_file() for s in samples)
    assert all(s.head == next(x.head for x in SPACES if x.source == s.source) for s in samples)
    assert try_images(served["url"], cfg, 4, API_KEY) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("truth:" in line and "models: cnn" in line for line in lines)
    assert try_images(served["url"], cfg, 1, "wrong-key") == 1  # a refused request is counted, not hidden
