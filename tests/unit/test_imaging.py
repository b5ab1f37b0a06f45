"""Decoding every Pillow mode to one grayscale range, on generated and real radiographs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.data.imaging import (
    ImageDecodeError,
    decode_gray,
    decode_png_gray,
    encode_png,
    perceptual_hash,
    resize_square,
)


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


GRADIENT = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64x64, 0..252
NOISE = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P"])
def test_8bit_modes_decode_to_the_same_gray(mode):
    pixels, original = decode_gray(_encode(Image.fromarray(GRADIENT, "L").convert(mode)))
    assert original == mode
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64)
    assert np.abs(pixels.astype(int) - GRADIENT).max() <= 1


def test_16bit_png_is_windowed_to_full_range():
    twelve_bit = (GRADIENT.astype(np.uint16) * 16).astype(np.uint16)  # uses 0..4032 of 0..65535, like real 16-bit
    data = _encode(Image.fromarray(twelve_bit))  # uint16 -> mode I;16
    pixels, mode = decode_gray(data)
    assert mode.startswith("I")
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.corrcoef(pixels.ravel(), GRADIENT.ravel())[0, 1] > 0.999


def test_jpeg_decodes():
    pixels, _ = decode_gray(_encode(Image.fromarray(GRADIENT, "L").convert("RGB"), "JPEG"))
    assert pixels.shape == (64, 64) and np.abs(pixels.astype(int) - GRADIENT).mean() < 3


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"just some text, renamed to .png", "not_an_image"),
        (_encode(Image.fromarray(NOISE, "L"))[:2000], "truncated"),
    ],
)
def test_bad_bytes_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_gray(data)
    assert err.value.reason == reason


def test_pixel_limit_checked_from_header():
    with pytest.raises(ImageDecodeError) as err:
        decode_gray(_encode(Image.new("L", (300, 300))), max_pixels=10_000)
    assert err.value.reason == "too_large"


def test_storage_round_trip_and_hash():
    small = resize_square(GRADIENT, 32)
    assert small.shape == (32, 32)
    assert np.array_equal(decode_png_gray(encode_png(small)), small)
    brighter = np.clip(GRADIENT.astype(int) + 6, 0, 255).astype(np.uint8)
    other = NOISE
    distance = lambda a, b: bin((perceptual_hash(a) ^ perceptual_hash(b)) & (2**64 - 1)).count("1")  # noqa: E731
    assert distance(GRADIENT, brighter) <= 4
    assert distance(GRADIENT, other) > 16


def test_real_nih_rgba_and_gray_samples(real_samples):
    for name in ("00001369_000.png", "00002578_000.png", "00000211_000.png"):
        data = (real_samples / "nih" / "images" / name).read_bytes()
        pixels, mode = decode_gray(data)
        assert pixels.shape == (1024, 1024) and pixels.dtype == np.uint8
        assert mode in ("L", "RGBA")
        assert 20 < pixels.mean() < 235  # a radiograph, not a blank frame


def test_real_kermany_jpeg(real_samples):
    path = next((real_samples / "kermany" / "NORMAL").glob("*.jpeg"))
    pixels, _ = decode_gray(path.read_bytes())
    assert pixels.ndim == 2 and pixels.std() > 10


def test_8bit_grey_pngs_decode_to_the_same_pixels_on_opencvs_fast_path(monkeypatch, real_samples):
    """OpenCV decodes 8-bit grey PNGs (serving's hot path); its pixels are Pillow's, bit for bit."""
    import pipelines.data.imaging as imaging

    files = sorted((real_samples / "nih" / "images").glob("*.png"))[:10]
    rng = np.random.default_rng(3)
    blobs = [path.read_bytes() for path in files] + [encode_png(rng.integers(0, 256, (37, 91), dtype=np.uint8))]
    assert all(imaging.png_gray8_size(blob) for blob in blobs[-3:])  # the test exercises the fast path
    fast = [imaging.decode_gray(blob) for blob in blobs]
    monkeypatch.setattr(imaging, "png_gray8_size", lambda data: None)  # Pillow only
    slow = [imaging.decode_gray(blob) for blob in blobs]
    for (a, mode_a), (b, mode_b) in zip(fast, slow, strict=True):
        assert mode_a == mode_b  # "L", or RGBA for the two real samples Pillow decodes
        np.testing.assert_array_equal(a, b)


def test_a_truncated_grey_png_still_gets_pillows_reason():
    blob = encode_png(np.random.default_rng(4).integers(0, 256, (64, 64), dtype=np.uint8))
    with pytest.raises(ImageDecodeError) as err:
        decode_gray(blob[: len(blob) // 2])
    assert err.value.reason in ("truncated", "corrupt")
