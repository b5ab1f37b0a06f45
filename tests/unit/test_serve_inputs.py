"""Upload decoding and validation for serving (no Ray): PNG/JPEG/DICOM, limits, bombs, preprocessing parity, and
the answer's JSON per head (``serve.schema.prediction_body``)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from models.checkpoint import PreprocessSpec
from pipelines.config import Config
from pipelines.data.imaging import decode_png_gray, encode_png, resize_square
from pipelines.data.transforms import TransformSpec, build_transform, transform_images
from serve.inputs import InputLimits, InputRejected, decode_upload, detect_format
from serve.preprocess import Preprocessor
from serve.schema import GateSettings, prediction_body
from tests.helpers import SPACES, make_dicom

LIMITS = InputLimits(max_bytes=2 * 1024 * 1024, max_pixels=4_000_000, dicom_modalities=frozenset({"CR", "DX"}))


def gradient(height: int = 120, width: int = 100) -> np.ndarray:
    return np.add.outer(np.arange(height), np.arange(width)).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, mode: str = "L") -> bytes:
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def rejected(data: bytes, limits: InputLimits = LIMITS) -> InputRejected:
    with pytest.raises(InputRejected) as caught:
        decode_upload(data, limits)
    return caught.value


# ------------------------------------------------------------------------------------------ PNG, JPEG


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16"])
def test_png_modes_decode_to_grayscale(mode):
    pixels = gradient()
    data = encode(pixels, "PNG", "L" if mode == "I;16" else mode)
    if mode == "I;16":
        data = encode((pixels.astype(np.uint16) * 16), "PNG", "I;16")
    gray, fmt = decode_upload(data, LIMITS)
    assert fmt == "png" and gray.dtype == np.uint8 and gray.shape == pixels.shape
    assert np.corrcoef(gray.ravel(), pixels.ravel())[0, 1] > 0.99


def test_jpeg_decodes():
    gray, fmt = decode_upload(encode(gradient(), "JPEG", "RGB"), LIMITS)
    assert fmt == "jpeg" and gray.shape == (120, 100) and gray.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"", 400, "empty"),
        (b"hello, not an image", 415, "unsupported_type"),
        (b"GIF89a" + b"\0" * 50, 415, "unsupported_type"),
        (b"%PDF-1.7\n", 415, "unsupported_type"),
    ],
)
def test_bad_bytes_are_refused_with_status_and_reason(data, status, reason):
    err = rejected(data)
    assert (err.status, err.reason) == (status, reason)
    assert err.as_json()["error"]["reason"] == reason


def test_truncated_and_corrupt_png_are_400():
    data = encode(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8), "PNG")
    truncated = rejected(data[: len(data) // 2])
    assert truncated.status == 400 and truncated.reason in ("truncated", "corrupt")
    corrupt = bytearray(data)
    corrupt[100:400] = b"\xff" * 300
    assert rejected(bytes(corrupt)).status == 400


def test_upload_over_byte_limit_is_413():
    small = InputLimits(max_bytes=1000, max_pixels=LIMITS.max_pixels, dicom_modalities=LIMITS.dicom_modalities)
    noise = np.random.default_rng(1).integers(0, 255, (100, 100), dtype=np.uint8)
    err = rejected(encode(noise, "PNG"), small)
    assert (err.status, err.reason) == (413, "too_large")


def test_decompression_bomb_refused_from_header_without_decoding():
    # 10,000 x 10,000 black pixels compress to a few tens of kB; expanding them would take 100 MB
    bomb = encode(np.zeros((10_000, 10_000), dtype=np.uint8), "PNG")
    assert len(bomb) < LIMITS.max_bytes
    err = rejected(bomb)
    assert (err.status, err.reason) == (413, "too_large") and "10000x10000" in err.detail


# ---------------------------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2_keeps_polarity_and_is_windowed():
    pixels = (gradient().astype(np.uint16) * 16) + 100  # 12-bit-ish values
    data = make_dicom(pixels)
    assert detect_format(data) == "dicom"
    gray, fmt = decode_upload(data, LIMITS)
    assert fmt == "dicom" and gray.dtype == np.uint8 and gray.shape == pixels.shape
    assert gray.min() == 0 and gray.max() == 255  # min-max windowed to the full 8-bit range
    assert gray[0, 0] < gray[-1, -1]


def test_dicom_monochrome1_is_inverted():
    pixels = gradient().astype(np.uint16) * 16
    normal, _ = decode_upload(make_dicom(pixels, photometric="MONOCHROME2"), LIMITS)
    inverted, _ = decode_upload(make_dicom(pixels, photometric="MONOCHROME1"), LIMITS)
    np.testing.assert_array_equal(inverted, 255 - normal)


def test_dicom_of_other_modality_is_415():
    err = rejected(make_dicom(gradient().astype(np.uint16), modality="CT"))
    assert (err.status, err.reason) == (415, "modality_not_allowed") and "'CT'" in err.detail


def test_dicom_pixel_limit_checked_from_header():
    # header claims 3000 x 2000 but carries few bytes: refused on the header's size before any pixel decode
    small = InputLimits(LIMITS.max_bytes, max_pixels=1_000_000, dicom_modalities=LIMITS.dicom_modalities)
    pixels = np.zeros((10, 2000), dtype=np.uint16)
    err = rejected(make_dicom(pixels, rows=3000), small)
    assert (err.status, err.reason) == (413, "too_large")


def test_truncated_dicom_is_400():
    data = make_dicom(gradient().astype(np.uint16) * 16)
    err = rejected(data[: len(data) - 5000])
    assert err.status == 400


def test_dicom_without_pixels_is_400():
    data = make_dicom(gradient().astype(np.uint16))
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    assert (rejected(buffer.getvalue()).status, rejected(buffer.getvalue()).reason) == (400, "no_pixels")


# ------------------------------------------------------------------------------------ preprocessing parity


def test_served_image_matches_what_evaluation_feeds_the_model():
    """decode -> storage size (as ingest) -> evaluation transform, byte for byte the path through the shards."""
    rng = np.random.default_rng(3)
    original = rng.integers(0, 255, (300, 260), dtype=np.uint8)
    storage, input_size = 96, 64
    stored_png = encode_png(resize_square(original, storage))  # what ingest writes
    cfg = Config.model_validate({"model": {"input_size": input_size}})
    transform = build_transform(TransformSpec.from_config(cfg), train=False)
    expected = transform_images([decode_png_gray(stored_png)], transform)[0]
    served = Preprocessor(PreprocessSpec(storage, input_size))(decode_upload(encode(original, "PNG"), LIMITS)[0])
    assert served.shape == (1, input_size, input_size) and served.dtype == np.uint8
    np.testing.assert_array_equal(served, expected)


def test_preprocess_spec_from_checkpoint_meta():
    meta = {"preprocessing": {"input_size": 64}, "config": {"data": {"storage_size": 128}}}
    assert PreprocessSpec.from_checkpoint_meta(meta) == PreprocessSpec(128, 64)
    assert PreprocessSpec.from_checkpoint_meta({"preprocessing": {"input_size": 32}}).storage_size == 256


def test_gate_settings_validate_user_config():
    settings = GateSettings.from_user_config({"w_cnn": 0.3, "threshold": 0.9, "finding_thresholds": {"Hernia": 0.2}})
    assert settings.threshold == 0.9 and settings.finding_thresholds == {"Hernia": 0.2}
    with pytest.raises(ValueError, match="threshold"):
        GateSettings.from_user_config({"w_cnn": 0.3, "threshold": 1.5})
    with pytest.raises(ValueError, match="unknown keys"):
        GateSettings.from_user_config({"w_cnn": 0.3, "threshold": 0.5, "thresold": 0.2})


def test_prediction_body_answers_every_head_with_its_binary_answer():
    """Three heads: nih14 (multi-label, binary "abnormal"), covid (multi-class, no binary answer) and pneumonia
    (multi-class, binary "pneumonia": the probability of the classes outside its negatives)."""
    nih = np.full(14, 0.1, np.float32)
    nih[[2, 5]] = [0.3, 0.6]
    probs = {"nih14": nih, "covid": np.array([0.1, 0.2, 0.6, 0.1]), "pneumonia": np.array([0.3, 0.5, 0.2])}
    settings = GateSettings(w_cnn=0.4, threshold=0.85, finding_thresholds={"Effusion": 0.25})
    body = prediction_body(probs, SPACES, settings)
    assert body["heads"] == ["nih14", "covid", "pneumonia"]
    nih_answer, covid, pneumonia = body["nih14"], body["covid"], body["pneumonia"]
    assert nih_answer["multi_label"] and nih_answer["findings"] == ["Effusion", "Nodule"]  # Effusion at its own 0.25
    assert nih_answer["binary"] == {"name": "abnormal", "probability": pytest.approx(0.6), "positive": True}
    assert (covid["top_class"], covid["binary"], covid["multi_label"]) == ("Normal", None, False)
    assert covid["top_probability"] == pytest.approx(0.6) and "findings" not in covid
    assert list(pneumonia["probabilities"]) == list(SPACES[2].classes)
    assert pneumonia["top_class"] == SPACES[2].classes[1]
    negatives = sum(probs["pneumonia"][SPACES[2].class_index(name)] for name in SPACES[2].negatives)
    assert pneumonia["binary"] == {"name": "pneumonia", "probability": pytest.approx(1 - negatives), "positive": True}
    # confidence over every head: the least certain nih14 finding (0.6 -> 0.6), covid's 0.6, pneumonia's 0.5
    assert body["confidence"] == pytest.approx(0.5)
    unsure = prediction_body({**probs, "nih14": np.full(14, 0.1, np.float32)}, SPACES, GateSettings(0.4, 0.85))
    assert unsure["nih14"]["findings"] == [] and unsure["nih14"]["binary"]["positive"] is False
