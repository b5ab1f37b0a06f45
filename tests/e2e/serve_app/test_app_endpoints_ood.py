"""The out-of-distribution check over HTTP (the package's one app, its check fitted on the tiny shards): what is
not a chest radiograph gets 422 with its score, ``?ood=off`` answers it anyway, and every answer carries the score."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from pipelines.evaluate.negatives import negatives
from tests.helpers import HEADERS, encode_png, png, post

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def predict(served, data, **params):
    return requests.post(served["url"] + "/v1/predict", data=data, params=params, headers=HEADERS, timeout=60)


@pytest.mark.parametrize("kind", ["noise", "document", "tiny", "dicom_ct", "hand"])
def test_a_non_radiograph_is_refused_with_its_score(served, kind):
    image = negatives(per_kind=1, seed=3, kinds=(kind,))[kind][0]
    answer = predict(served, encode_png(image))
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["error"]["reason"] == "not_a_chest_radiograph" and "ood=off" in body["error"]["detail"]
    assert body["ood"]["refused"] and body["ood"]["score"] > body["ood"]["threshold"]


def test_ood_off_answers_it_and_every_answer_carries_the_score(served):
    noise = encode_png(np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8))
    answered = predict(served, noise, ood="off", mode="cnn")
    assert answered.status_code == 200, answered.text
    ood = answered.json()["ood"]
    assert ood["checked"] is False and ood["score"] > ood["threshold"]

    body = post(served, data=png(seed=31), mode="cnn").json()  # a radiograph of the kind it was fitted on
    assert body["ood"]["checked"] is True and body["ood"]["score"] < body["ood"]["threshold"]
    assert "nih14" in body

    bad = predict(served, png(seed=31), ood="maybe")
    assert bad.status_code == 400 and bad.json()["error"]["reason"] == "bad_ood"


def test_a_batch_refuses_only_its_non_radiographs_and_explain_refuses_too(served):
    noise = encode_png(np.random.default_rng(1).integers(0, 256, (96, 96), dtype=np.uint8))
    files = [("files", ("chest.png", png(seed=32))), ("files", ("noise.png", noise))]
    results = post(served, files=files, path="/v1/predict/batch").json()["results"]
    assert [r["status"] for r in results] == [200, 422]
    assert results[1]["error"]["reason"] == "not_a_chest_radiograph"

    refused = requests.post(served["url"] + "/v1/explain", data=noise, headers=HEADERS, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"]["reason"] == "not_a_chest_radiograph"
    described = requests.get(served["url"] + "/v1/model", headers=HEADERS, timeout=30).json()["ood"]
    assert described["enabled"] and described["threshold"] == pytest.approx(refused.json()["ood"]["threshold"])
