"""`POST /v1/explain` over HTTP: the served Grad-CAM is the checkpoint's computed in process; defaults, formats,
validation and the key (the package's one app, see conftest.py)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from models.checkpoint import PreprocessSpec, model_from_checkpoint
from pipelines.data.datasets.nih import NIH14
from pipelines.data.datasets.pneumonia import CLASSES as PNEUMONIA_CLASSES
from serve.preprocess import Preprocessor
from tests.helpers import APP_MAX_UPLOAD_MB, HEADERS, png, post

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def explain(served, data, headers=HEADERS, **params):
    return requests.post(served["url"] + "/v1/explain", data=data, params=params, headers=headers, timeout=60)


def test_explain_cnn_is_the_grad_cam_of_the_checkpoint_in_process(served):
    from models.explain import grad_cam

    data = png(300, seed=21)
    answer = explain(served, data, head="nih14", target="Cardiomegaly", model="cnn")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["head"], body["target"], body["model"]) == ("nih14", "Cardiomegaly", "cnn")
    model = model_from_checkpoint(served["checkpoints"]["cnn"])
    gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    expected = grad_cam(model, Preprocessor(PreprocessSpec(64, 64))(gray)[None], "nih14", NIH14.index("Cardiomegaly"))
    served_map = np.array(body["map"]["values"])
    assert served_map.shape == (body["map"]["height"], body["map"]["width"]) == expected[0].cam.shape
    np.testing.assert_allclose(served_map, expected[0].cam, atol=2e-3)  # the JSON rounds to 4 decimals
    assert body["probability"] == pytest.approx(expected[0].probability, abs=1e-5)
    assert body["method"]["cnn"].startswith("grad-cam on backbone.blocks")
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (256, 256)
    assert body["model_versions"] == {"cnn": "cnn"} and body["latency_ms"]["explain"] > 0


def test_explain_any_head_of_the_model_the_third_one_too(served):
    """`?head=pneumonia`: the map and probability of a pneumonia class, as the checkpoint computes them."""
    from models.explain import grad_cam

    data = png(200, seed=25)
    body = explain(served, data, head="pneumonia", target="viral", model="cnn").json()
    assert (body["head"], body["target"]) == ("pneumonia", "viral")
    model = model_from_checkpoint(served["checkpoints"]["cnn"])
    gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    image = Preprocessor(PreprocessSpec(64, 64))(gray)[None]
    expected = grad_cam(model, image, "pneumonia", PNEUMONIA_CLASSES.index("viral"))[0]
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-5)
    np.testing.assert_allclose(np.array(body["map"]["values"]), expected.cam, atol=2e-3)
    predicted = post(served, data=data, mode="cnn").json()["pneumonia"]
    assert body["probability"] == pytest.approx(predicted["probabilities"]["viral"], abs=1e-5)
    default = explain(served, data, model="cnn").json()  # no head: the model's first head, its top label
    assert default["head"] == "nih14"


def test_explain_defaults_to_the_top_label_and_fuses_the_ensemble(served):
    data = png(seed=22)
    predicted = post(served, data=data, mode="ensemble").json()
    top = max(predicted["covid"]["probabilities"], key=predicted["covid"]["probabilities"].get)
    body = explain(served, data, head="covid", model="ensemble").json()
    assert body["target"] == top and set(body["method"]) == {"cnn", "vit"}
    assert body["probability"] == pytest.approx(predicted["covid"]["probabilities"][top], abs=1e-5)
    vit = explain(served, data, head="covid", model="vit", target=top).json()
    assert vit["method"]["vit"].startswith("grad-cam on backbone.blocks") and vit["map"]["height"] == 4


def test_explain_png_format_answers_the_image(served):
    answer = explain(served, png(seed=23), model="vit", format="png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(answer.content)).size == (256, 256)


@pytest.mark.parametrize(
    ("params", "data", "status", "reason"),
    [
        ({"target": "Cardiomegally"}, None, 400, "bad_target"),
        ({"model": "adaptive"}, None, 400, "bad_model"),
        ({"head": "chexpert"}, None, 400, "bad_head"),
        ({"method": "rollout"}, None, 400, "bad_method"),
        ({"method": "attention", "model": "ensemble"}, None, 400, "unsupported_method"),  # tiny CNN/ViT have none
        ({}, b"not an image", 415, "unsupported_type"),
        ({}, b"\x89PNG" + bytes(int(APP_MAX_UPLOAD_MB * 2**20)), 413, "too_large"),
    ],
)
def test_explain_validates_like_predict(served, params, data, status, reason):
    answer = explain(served, data if data is not None else png(seed=24), **params)
    assert answer.status_code == status and answer.json()["error"]["reason"] == reason, answer.text
    if reason == "bad_target":
        assert "Cardiomegaly" in answer.json()["error"]["detail"]  # the known labels are listed


def test_explain_needs_the_key(served):
    assert explain(served, png(seed=25), headers={}).status_code == 401
