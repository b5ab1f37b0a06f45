"""Many images from a few renders: the stand-in for the full datasets at their real counts in minutes, not hours.

With ``data.synth.render_pool`` = N, every image of one source and label set derives from one of N base renders
(chosen by the image's own seeded stream) through a cheap seeded variation: a small shift, scale and rotation,
a gamma and fresh noise. Each file therefore differs from every other and still shows its labels' signs; a
patient's follow-ups no longer share one anatomy. Base renders depend only on (seed, source, label set, slot, size),
so the bytes on disk stay the same for any number of workers; callers sort images by ``base_key`` so that each
worker meets a base in one run of its chunk and its small cache holds it.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import cv2
import numpy as np

from pipelines.data.synth.render import SOURCE_CODES, render_image

POOL = 5  # the random stream of the pool choices and variations, apart from the renderer's own streams
BASE_PATIENTS = 10_000_000  # base renders use pseudo patients above every real patient number


def pool_slot(seed: int, source: str, image_index: int, pool: int) -> int:
    """Which of the ``pool`` bases of its label set an image derives from."""
    return int(np.random.default_rng([seed, POOL, SOURCE_CODES[source], image_index, 0]).integers(pool))


def base_key(seed: int, source: str, image_index: int, labels: Sequence[str], pool: int) -> tuple:
    return (source, tuple(labels), pool_slot(seed, source, image_index, pool))


@functools.lru_cache(maxsize=64)
def _base(seed: int, source: str, labels: tuple[str, ...], slot: int, size: int) -> np.ndarray:
    patient = BASE_PATIENTS + (zlib.crc32("|".join(labels).encode()) % 100_000) * 1000 + slot
    return render_image(seed, source, patient, patient, labels, size)


def pooled_image(seed: int, source: str, image_index: int, labels: Sequence[str], size: int, pool: int) -> np.ndarray:
    """A float32 image in [0, 1]: one of the label set's base renders, varied by the image's own stream."""
    base = _base(seed, source, tuple(labels), pool_slot(seed, source, image_index, pool), size)
    return vary(base, np.random.default_rng([seed, POOL, SOURCE_CODES[source], image_index, 1]))


def vary(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-2.0, 2.0), rng.uniform(0.97, 1.03))
    matrix[:, 2] += rng.uniform(-0.03, 0.03, 2) * size
    out = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out = np.clip(out, 0.0, 1.0) ** rng.uniform(0.9, 1.1)
    out = out + rng.normal(0.0, 0.01, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
