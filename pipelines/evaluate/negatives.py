"""Images that are not chest radiographs, made here or shipped by pydicom, to measure the out-of-distribution check.

Each kind is a list of grayscale uint8 images, as the serving path decodes them (``decode_gray``'s output), drawn
from a seeded generator so every run measures the same set:

- ``noise``: Gaussian and uniform pixel noise;
- ``texture``: natural-image-like fields (a 1/f^a power spectrum, the statistics of photographs) and regular
  patterns (stripes, checkerboards);
- ``document``: a white page of text lines, sometimes a table rule;
- ``blank``: one grey level everywhere; ``tiny``: 1 to 8 px a side (what a 1x1 PNG decodes to);
- ``dicom_ct`` / ``dicom_mr``: the CT and MR test slices pydicom ships (windowed to 8 bits as the router does), with
  flipped and cropped copies;
- ``hand`` / ``skull``: radiograph look-alikes of another body part (bright bone on a dark field), synthesised.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("noise", "texture", "document", "blank", "tiny", "dicom_ct", "dicom_mr", "hand", "skull")
DICOM_FILES = {"dicom_ct": ("CT_small.dcm", "liver_1frame.dcm"), "dicom_mr": ("MR_small.dcm",)}


def negatives(per_kind: int = 20, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> dict[str, list[np.ndarray]]:
    """``per_kind`` images of each kind (the DICOM kinds: their slices and copies, up to ``per_kind``)."""
    found = {}
    for code, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, code])
        if kind in DICOM_FILES:
            found[kind] = _dicom_kind(DICOM_FILES[kind], per_kind)
        else:
            found[kind] = [MAKERS[kind](rng) for _ in range(per_kind)]
    return found


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(256, 513)), int(rng.integers(256, 513))


def _noise(rng: np.random.Generator) -> np.ndarray:
    shape = _size(rng)
    if rng.random() < 0.5:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), shape), 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator) -> np.ndarray:
    height, width = _size(rng)
    if rng.random() < 0.6:  # 1/f^a noise: the power spectrum of natural photographs
        fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
        radius = np.hypot(fx, fy)
        radius[0, 0] = 1.0
        spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius ** rng.uniform(1, 1.6)
        field = np.real(np.fft.ifft2(spectrum))
        return _to_uint8(field)
    y, x = np.mgrid[0:height, 0:width]
    period, angle = rng.uniform(6, 40), rng.uniform(0, np.pi)
    phase = (x * np.cos(angle) + y * np.sin(angle)) / period
    if rng.random() < 0.5:
        return _to_uint8(np.sin(2 * np.pi * phase))
    return ((np.floor(x / period) + np.floor(y / period)) % 2 * 255).astype(np.uint8)


def _document(rng: np.random.Generator) -> np.ndarray:
    height, width = _size(rng)
    page = Image.new("L", (width, height), int(rng.integers(225, 256)))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=int(rng.integers(10, 18)))
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz      "))
    y = int(rng.integers(8, 30))
    while y < height - 20:
        line = "".join(rng.choice(letters, int(rng.integers(20, 80))))
        draw.text((int(rng.integers(8, 30)), y), line, fill=int(rng.integers(0, 60)), font=font)
        if rng.random() < 0.1:
            draw.line([(10, y + 16), (width - 10, y + 16)], fill=0, width=1)
        y += int(rng.integers(16, 26))
    return np.asarray(page)


def _blank(rng: np.random.Generator) -> np.ndarray:
    return np.full(_size(rng), int(rng.choice([0, 255, int(rng.integers(1, 255))])), np.uint8)


def _tiny(rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(1, 9))
    return rng.integers(0, 256, (side, side), dtype=np.uint8)


def _hand(rng: np.random.Generator) -> np.ndarray:
    """A hand radiograph look-alike: palm bones and five fingers of phalanges, bright on a dark field."""
    size = int(rng.integers(320, 513))
    image = np.full((size, size), int(rng.integers(5, 40)), np.float32)
    soft, bone = rng.uniform(60, 90), rng.uniform(170, 230)
    cx, wrist = size / 2 + rng.uniform(-20, 20), size * 0.95
    palm_top = size * rng.uniform(0.5, 0.58)
    cv2.ellipse(image, (int(cx), int((palm_top + wrist) / 2)), (int(size * 0.2), int(size * 0.25)), 0, 0, 360, soft, -1)
    for finger, spread in enumerate(np.linspace(-0.6, 0.6, 5)):
        base = np.array([cx + spread * size * 0.28, palm_top])
        direction = np.array([np.sin(spread * 0.5), -np.cos(spread * 0.5)])
        length = size * (0.22 if finger in (0, 4) else 0.32) * rng.uniform(0.9, 1.1)
        tip = base + direction * length
        cv2.line(image, _point(base), _point(tip), soft, int(size * 0.05))
        metacarpal = base - direction * size * 0.18
        cv2.line(image, _point(metacarpal), _point(base - direction * 6), bone, int(size * 0.02))
        for start, end in ((0.0, 0.45), (0.5, 0.8), (0.84, 1.0)):  # three phalanges with joint gaps
            cv2.line(
                image,
                _point(base + direction * length * start),
                _point(base + direction * length * end),
                bone,
                int(size * 0.018),
            )
    return _finish(image, rng)


def _skull(rng: np.random.Generator) -> np.ndarray:
    """A lateral skull look-alike: a thick bright vault, a jaw and the orbit, on a dark field."""
    size = int(rng.integers(320, 513))
    image = np.full((size, size), int(rng.integers(5, 40)), np.float32)
    center = (size // 2, int(size * 0.45))
    axes = (int(size * rng.uniform(0.34, 0.4)), int(size * rng.uniform(0.28, 0.34)))
    cv2.ellipse(image, center, axes, 0, 0, 360, rng.uniform(70, 100), -1)
    cv2.ellipse(image, center, axes, 0, 0, 360, rng.uniform(180, 235), int(size * 0.03))
    cv2.ellipse(
        image,
        (int(size * 0.42), int(size * 0.78)),
        (int(size * 0.2), int(size * 0.1)),
        0,
        0,
        180,
        200,
        int(size * 0.025),
    )
    cv2.circle(image, (int(size * 0.28), int(size * 0.5)), int(size * 0.06), 45, -1)
    return _finish(image, rng)


def _point(xy: np.ndarray) -> tuple[int, int]:
    return int(round(xy[0])), int(round(xy[1]))


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur and film grain, as a radiograph has."""
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(1.0, 2.5))
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, (1, 99))
    return np.clip((values - low) / max(high - low, 1e-9) * 255, 0, 255).astype(np.uint8)


def _dicom_kind(names: tuple[str, ...], count: int) -> list[np.ndarray]:
    """pydicom's test slices, windowed to 8 bits, each with flipped and centre-cropped copies."""
    import pydicom
    from pydicom.data import get_testdata_file

    slices = []
    for name in names:
        dataset = pydicom.dcmread(get_testdata_file(name))
        slices.append(_to_uint8(dataset.pixel_array.astype(np.float32)))
    copies = []
    for image in slices:
        h, w = image.shape
        copies += [image, image[:, ::-1], image[::-1], image[h // 8 : h - h // 8, w // 8 : w - w // 8]]
    return [np.ascontiguousarray(image) for image in copies[:count]]


MAKERS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "noise": _noise,
    "texture": _texture,
    "document": _document,
    "blank": _blank,
    "tiny": _tiny,
    "hand": _hand,
    "skull": _skull,
}
