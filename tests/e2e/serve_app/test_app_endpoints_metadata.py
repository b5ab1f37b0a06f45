"""Patient metadata over HTTP against the package's app, whose CNN has the fusion head (see conftest.py): form
fields, query parameters and a DICOM header reach the model, its answer moves with them as the checkpoint computes
in process, the cache keeps them apart, and the answer reports what was used."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from models.checkpoint import PreprocessSpec, model_from_checkpoint
from models.metadata import encode
from pipelines.data.imaging import decode_gray
from serve.preprocess import Preprocessor
from serve.replicas import probabilities
from tests.helpers import HEADERS, make_dicom, png, post

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OLD_MAN = {"age": "80", "sex": "M", "view_position": "PA"}
YOUNG_WOMAN = {"age": "20", "sex": "F", "view_position": "AP"}


def nih14(body: dict) -> np.ndarray:
    return np.array(list(body["nih14"]["probabilities"].values()))


def test_form_and_query_metadata_reach_the_fusion_cnn(served):
    info = requests.get(served["url"] + "/v1/model", headers=HEADERS, timeout=10).json()
    assert info["models"]["cnn"]["metadata_fusion"] is True and info["models"]["vit"]["metadata_fusion"] is False
    image = png(64, seed=11)
    bodies = {}
    for name, fields in {"none": {}, "old": OLD_MAN, "young": YOUNG_WOMAN}.items():
        answer = post(served, data=fields or None, files={"file": ("x.png", image)}, mode="cnn")
        assert answer.status_code == 200, answer.text
        bodies[name] = answer.json()
    model = model_from_checkpoint(served["checkpoints"]["cnn"])
    model_input = Preprocessor(PreprocessSpec(64, 64))(np.asarray(Image.open(io.BytesIO(image)).convert("L")))[None]
    for name, fields in {"none": {}, "old": OLD_MAN, "young": YOUNG_WOMAN}.items():
        expected = probabilities(model, model_input, "cpu", encode(**fields)[None])["nih14"][0]
        np.testing.assert_allclose(nih14(bodies[name]), expected, atol=1e-5)
    assert not np.allclose(nih14(bodies["old"]), nih14(bodies["young"]), atol=1e-6)
    assert not bodies["young"]["cache"]["hit"]  # same pixels, other metadata: not the cached answer
    assert bodies["none"]["metadata"] == {
        "age": None,
        "sex": None,
        "view_position": None,
        "source": "none",
        "used_by": ["cnn"],
    }
    assert bodies["old"]["metadata"] == {**OLD_MAN, "age": 80, "source": "request", "used_by": ["cnn"]}
    # a raw body takes the same fields as query parameters; same values, same key: the cached answer
    params = {"mode": "cnn", **YOUNG_WOMAN}
    raw = requests.post(served["url"] + "/v1/predict", params=params, data=image, headers=HEADERS, timeout=60).json()
    assert raw["cache"]["hit"] and raw["metadata"]["source"] == "request"
    np.testing.assert_allclose(nih14(raw), nih14(bodies["young"]), atol=1e-6)


def test_dicom_header_metadata_explicit_fields_win_and_bad_fields_are_refused(served):
    pixels = decode_gray(png(96, seed=41))[0].astype(np.uint16)  # radiograph-like: the OOD check passes it
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(pixels)))
    dataset.PatientAge, dataset.PatientSex, dataset.ViewPosition = "058Y", "M", "PA"
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    dicom = buffer.getvalue()
    header = post(served, data=dicom, mode="cnn").json()
    assert header["metadata"] == {"age": 58, "sex": "M", "view_position": "PA", "source": "dicom", "used_by": ["cnn"]}
    mixed = post(served, data={"sex": "F"}, files={"file": ("x.dcm", dicom)}, mode="cnn").json()
    assert mixed["metadata"]["sex"] == "F" and mixed["metadata"]["source"] == "request+dicom"
    assert not np.allclose(nih14(header), nih14(mixed), atol=1e-6)
    bad = post(served, data={"age": "old"}, files={"file": ("x.dcm", dicom)}, mode="cnn")
    assert bad.status_code == 400 and bad.json()["error"]["reason"] == "bad_metadata"
    assert bad.json()["error"]["detail"].startswith("age:")
    files = [("files", ("a.png", png(48, seed=12))), ("files", ("b.dcm", dicom))]
    batch = post(served, data={"age": "40"}, files=files, path="/v1/predict/batch", mode="cnn").json()["results"]
    assert [r["metadata"]["age"] for r in batch] == [40, 40]  # the form's age for every image, over the header's
    assert [r["metadata"]["source"] for r in batch] == ["request", "request+dicom"]
