"""Patient metadata in serving (no Ray): the request's fields and a DICOM header into the fusion head's vector, the
400 on a bad field, the answer's ``metadata`` object, the result cache keyed by metadata, and the replica's batch
(a fusion model reads the rows, other models are called with images alone)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest

from models.metadata import encode
from serve.cache import LruStore, ResultCache, cache_key, image_digest
from serve.inputs import InputLimits, InputRejected
from serve.metadata import PatientMetadata, decode_with_metadata, request_fields, resolve
from serve.pipeline import EnsemblePipeline
from serve.replicas import metadata_batch, probabilities
from serve.schema import GateSettings
from tests.helpers import CACHE_FINGERPRINTS, SPACES, make_dicom, png
from tests.helpers import router_answer as answer
from tests.helpers import run_async as run

LIMITS = InputLimits(max_bytes=2 * 1024 * 1024, max_pixels=4_000_000, dicom_modalities=frozenset({"CR", "DX"}))
SETTINGS = GateSettings(w_cnn=0.4, threshold=0.85)


def dicom_with(**header: str) -> bytes:
    """A DX radiograph whose header carries ``header`` (PatientAge, PatientSex, ViewPosition, any value)."""
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(np.add.outer(np.arange(48), np.arange(48)).astype(np.uint16))))
    with warnings.catch_warnings():  # pydicom warns about values its VR does not allow; those are the point here
        warnings.simplefilter("ignore")
        for tag, value in header.items():
            setattr(dataset, tag, value)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- request fields


def test_request_fields_parse_from_the_form_or_the_query_and_blank_counts_as_absent():
    assert request_fields({"age": " 58 ", "sex": "male", "view_position": "pa"}, {}) == {
        "age": 58.0,
        "sex": "M",
        "view_position": "PA",
    }
    assert request_fields({}, {"sex": "f", "age": "0.5"}) == {"sex": "F", "age": 0.5}
    assert request_fields({"age": "", "sex": "  "}, {"mode": "cnn"}) == {}  # an HTML form sends empty fields


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"age": "fifty"}, "age"),
        ({"age": "131"}, "age"),
        ({"age": "-1"}, "age"),
        ({"age": "nan"}, "age"),
        ({"sex": "X"}, "sex"),
        ({"view_position": "LL"}, "view_position"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(form, field):
    with pytest.raises(InputRejected) as caught:
        request_fields(form, {})
    assert (caught.value.status, caught.value.reason) == (400, "bad_metadata")
    assert caught.value.detail.startswith(f"{field}: ") and repr(next(iter(form.values()))) in caught.value.detail


def test_a_field_in_both_the_form_and_the_query_is_refused():
    with pytest.raises(InputRejected, match="age: given both"):
        request_fields({"age": "40"}, {"age": "40"})


def _multipart_request(fields: list):
    from starlette.requests import Request
    from urllib3 import encode_multipart_formdata

    body, content_type = encode_multipart_formdata(fields)

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "headers": headers, "query_string": b""}, receive)


def test_multipart_text_fields_come_back_beside_the_files():
    from serve.uploads import read_request

    fields = [("file", ("a.png", png(32))), ("age", "58"), ("sex", "M"), ("view_position", "PA")]
    uploads, form = run(read_request(_multipart_request(fields), 1024 * 1024, 1))
    assert [upload.filename for upload in uploads] == ["a.png"] and uploads[0].data == png(32)
    assert form == {"age": "58", "sex": "M", "view_position": "PA"}


def test_a_multipart_body_without_a_file_part_is_a_400_not_an_image():
    """A text field is never taken for an image (the batch endpoint used to answer 200 with a per-item 415)."""
    from serve.uploads import read_request

    with pytest.raises(InputRejected, match="no file part") as caught:
        run(read_request(_multipart_request([("files", "not a file"), ("age", "58")]), 1024 * 1024, 4))
    assert (caught.value.status, caught.value.reason) == (400, "no_file")


# ------------------------------------------------------------------------------------------- DICOM header


def test_dicom_header_supplies_what_the_request_left_out_and_the_request_wins():
    data = dicom_with(PatientAge="058Y", PatientSex="M", ViewPosition="PA")
    gray, image_format, found = decode_with_metadata(data, LIMITS, {})
    assert image_format == "dicom" and gray.shape == (48, 48)
    assert found == PatientMetadata(age=58.0, sex="M", view_position="PA", source="dicom")
    np.testing.assert_array_equal(found.vector(), encode("058Y", "M", "PA"))
    _, _, mixed = decode_with_metadata(data, LIMITS, request_fields({"sex": "F"}, {}))
    assert mixed == PatientMetadata(age=58.0, sex="F", view_position="PA", source="request+dicom")
    typed_fields = request_fields({"age": "30", "sex": "F", "view_position": "AP"}, {})
    _, _, typed = decode_with_metadata(data, LIMITS, typed_fields)
    assert typed.source == "request" and typed.age == 30.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"PatientAge": "006M"}, {"age": 0.5}),  # infants: months, weeks and days become years
        ({"PatientAge": "014D", "ViewPosition": "AP"}, {"age": 14 / 365.25, "view_position": "AP"}),
        ({"PatientAge": "abcY", "PatientSex": "O", "ViewPosition": "LL"}, {}),  # unreadable or other: missing
        ({"PatientAge": "150Y", "PatientSex": "F"}, {"sex": "F"}),
        ({}, {}),
    ],
)
def test_unreadable_header_values_count_as_missing(header, expected):
    _, _, found = decode_with_metadata(dicom_with(**header), LIMITS, {})
    values = {name: getattr(found, name) for name in ("age", "sex", "view_position")}
    assert {k: v for k, v in values.items() if v is not None} == pytest.approx(expected)
    assert found.source == ("dicom" if expected else "none")


def test_a_png_has_no_header_metadata_and_answers_as_all_missing():
    _, image_format, found = decode_with_metadata(png(64, seed=1), LIMITS, {})
    assert image_format == "png" and found == PatientMetadata()
    np.testing.assert_array_equal(found.vector(), encode())
    assert found.as_json(["cnn"]) == {
        "age": None,
        "sex": None,
        "view_position": None,
        "source": "none",
        "used_by": ["cnn"],
    }
    assert resolve({"age": 58.0}).as_json([])["age"] == 58 and resolve({"age": 0.5}).as_json([])["age"] == 0.5


# ------------------------------------------------------------------------------------------- result cache


def test_the_cache_key_differs_by_metadata_and_no_metadata_is_the_all_missing_row():
    digest = image_digest(np.arange(64, dtype=np.uint8).reshape(8, 8))

    def key(metadata):
        return cache_key(digest, "adaptive", ("nih14",), SETTINGS, CACHE_FINGERPRINTS, metadata)

    old, young = resolve({"age": 70.0, "sex": "M"}).vector(), resolve({"age": 20.0, "sex": "M"}).vector()
    assert len({key(None), key(old), key(young), key(resolve({"sex": "F"}).vector())}) == 4
    assert key(None) == key(encode()) == key(PatientMetadata().vector())
    assert key(resolve({"age": 58.0}).vector()) == key(encode("058Y"))  # what the model reads, not how it came


def test_the_same_image_with_other_metadata_is_not_served_the_cached_answer():
    cache = ResultCache(LruStore(8))
    gray = np.full((16, 16), 7, np.uint8)
    male, female = resolve({"sex": "M"}).vector(), resolve({"sex": "F"}).vector()
    lookup = run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, CACHE_FINGERPRINTS, male))
    run(cache.remember(lookup, "cnn", ("nih14",), SETTINGS, answer()))
    assert run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, CACHE_FINGERPRINTS, male.copy())).hit
    assert not run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, CACHE_FINGERPRINTS, female)).hit
    assert not run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, CACHE_FINGERPRINTS)).hit


# ------------------------------------------------------------------------------------------- pipeline, replica


class RecordingHandle:
    """A DeploymentHandle stand-in that records the arguments of each ``predict`` call."""

    def __init__(self, fusion: bool) -> None:
        self.calls: list[tuple] = []
        handle = self

        class Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, *args):
                return handle.serve(self.name, args)

        self.describe, self.predict = Method("describe"), Method("predict")
        self.fusion = fusion

    async def serve(self, method: str, args: tuple) -> dict:
        if method == "describe":
            spaces = [space.to_dict() for space in SPACES]
            meta = {"storage_size": 32, "input_size": 32}
            return {"fingerprint": "f", "preprocessing": meta, "label_spaces": spaces, "metadata_fusion": self.fusion}
        self.calls.append(args)
        return {space.head: np.full(len(space.classes), 1 / len(space.classes), np.float32) for space in SPACES}


def test_the_pipeline_sends_the_metadata_row_with_the_image_and_reports_who_reads_it():
    cnn, vit = RecordingHandle(fusion=True), RecordingHandle(fusion=False)
    pipeline = EnsemblePipeline({"cnn": cnn, "vit": vit}, timeout_s=5)
    row = resolve({"age": 40.0, "view_position": "AP"}).vector()
    result = run(pipeline.answer(np.zeros((40, 40), np.uint8), "ensemble", SETTINGS, None, row))
    for handle in (cnn, vit):
        ((image, sent),) = handle.calls
        assert image.shape == (1, 32, 32) and sent is row
    assert pipeline.metadata_users(result["models_used"]) == ["cnn"]


def test_the_replica_batch_fills_missing_rows_and_a_fusion_model_reads_them():
    import torch

    from models.factory import build_model

    rows = metadata_batch([None, encode(58, "M", "PA")], 2)
    assert rows.dtype == np.float32 and rows.shape == (2, 8)
    np.testing.assert_array_equal(rows[0], encode())
    np.testing.assert_array_equal(metadata_batch(None, 3), np.stack([encode()] * 3))
    torch.manual_seed(0)
    fusion = build_model("test_efficientnet", 32, SPACES, metadata=True).eval()
    images = np.stack([np.random.default_rng(0).integers(0, 255, (1, 32, 32), np.uint8)] * 2)
    both = probabilities(fusion, images, "cpu", metadata_batch([encode(), encode(80, "F", "AP")], 2))
    assert not np.allclose(both["nih14"][0], both["nih14"][1])
    np.testing.assert_allclose(probabilities(fusion, images, "cpu")["nih14"], both["nih14"][[0, 0]], atol=1e-6)
