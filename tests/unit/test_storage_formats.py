"""Shard storage formats (``data.storage_format``): every format gives back the same pixels and the same model
input; a broken raw image is an error that says so. No Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.data.imaging import STORAGE_FORMATS, ImageDecodeError, decode_stored, encode_stored
from pipelines.data.transforms import TransformSpec, preprocess_table
from tests.helpers import SPACES


def _pixels(side: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, side, dtype=np.float32)[None, :] + np.zeros((side, 1), np.float32)
    return np.clip(ramp + rng.normal(0, 20, (side, side)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("storage_format", STORAGE_FORMATS)
def test_every_format_gives_back_the_same_pixels(storage_format):
    pixels = _pixels()
    assert np.array_equal(decode_stored(encode_stored(pixels, storage_format)), pixels)


def test_formats_trade_bytes_for_decoding():
    pixels = _pixels(64)
    sizes = {name: len(encode_stored(pixels, name)) for name in STORAGE_FORMATS}
    assert sizes["raw"] == 64 * 64
    assert sizes["png"] < sizes["png_uncompressed"]  # stored deflate blocks: larger, nothing to inflate


def test_raw_bytes_that_are_not_a_square_image_are_refused():
    with pytest.raises(ImageDecodeError, match="neither PNG nor square raw"):
        decode_stored(b"\x00" * 50)
    with pytest.raises(ValueError, match="unknown storage format"):
        encode_stored(_pixels(), "jpeg")


def test_model_input_does_not_depend_on_the_format():
    images = [_pixels(48, seed) for seed in range(3)]
    labels = {  # the shards' columns: each row's source and its labels (0/1 vector or [class index])
        "source": pa.array(["nih", "covid", "pneumonia"]),
        "labels": pa.array([[1] + [0] * 13, [2], [1]], pa.list_(pa.int64())),
    }
    outputs = [
        preprocess_table(
            pa.table({"image": pa.array([encode_stored(i, name) for i in images], pa.binary()), **labels}),
            TransformSpec(32, SPACES),
            train=False,
        )
        for name in STORAGE_FORMATS
    ]
    assert outputs[0]["source"].tolist() == [0, 1, 2] and outputs[0]["label_pneumonia"].tolist() == [-1, -1, 1]
    for other in outputs[1:]:
        for key in outputs[0]:
            assert np.array_equal(outputs[0][key], other[key])
