"""The out-of-distribution check (models/ood.py): fitted on radiographs, it passes held-out radiographs of the same
kind and refuses every kind of non-radiograph the project makes or pydicom ships; it survives a save and load."""

from __future__ import annotations

import numpy as np
import pytest

from models.ood import OodDetector
from pipelines.evaluate.negatives import KINDS, negatives
from pipelines.evaluate.ood_rates import folder_images


def refused(detector: OodDetector, images: list[np.ndarray]) -> float:
    return float((detector.scores(images) > detector.threshold).mean())


@pytest.fixture(scope="module")
def negative_images():
    return negatives(per_kind=12, seed=7)


def test_negatives_are_every_kind_decoded_as_grey_images(negative_images):
    assert list(negative_images) == list(KINDS)
    for kind, images in negative_images.items():
        assert images, kind
        assert all(image.dtype == np.uint8 and image.ndim == 2 for image in images), kind
    assert max(max(image.shape) for image in negative_images["tiny"]) <= 8
    assert all(image.min() == image.max() for image in negative_images["blank"])


def test_fitted_on_generated_radiographs_it_refuses_every_negative_kind(negative_images):
    from pipelines.data.synth.render import render_image

    def radiographs(first: int, count: int, source: str = "nih") -> list[np.ndarray]:
        return [(render_image(0, source, p, p, [], 96) * 255).astype(np.uint8) for p in range(first, first + count)]

    train, val, held_out = radiographs(0, 90), radiographs(100, 40), radiographs(200, 40, "covid")
    detector = OodDetector.fit(train, side=32, components=16).with_threshold(val, 0.01)
    assert refused(detector, held_out) <= 0.1  # another source's radiographs, never seen
    for kind, images in negative_images.items():
        assert refused(detector, images) == 1.0, kind


def test_fitted_on_real_radiographs_held_out_real_ones_pass(real_samples, negative_images):
    """The check a model trained on real images gets: fitted on half of the real samples (NIH, Kermany, Hannover
    COVID), thresholded on a quarter, it lets the last quarter through and still refuses the negatives."""
    folders = ("nih", "kermany", "covid_hannover")
    images = [image for folder in folders for image in folder_images(real_samples / folder)]
    order = np.random.default_rng(0).permutation(len(images))
    half, three_quarters = len(images) // 2, 3 * len(images) // 4
    pick = lambda rows: [images[i] for i in rows]  # noqa: E731
    detector = OodDetector.fit(pick(order[:half]), side=32, components=16)
    detector = detector.with_threshold(pick(order[half:three_quarters]), 0.01)
    assert refused(detector, pick(order[three_quarters:])) <= 0.1
    for kind, found in negative_images.items():
        assert refused(detector, found) >= 0.9, kind


def test_threshold_save_and_load(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(128, 30, (32, 32))
    train = [np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8) for _ in range(200)]
    val = [np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8) for _ in range(400)]
    detector = OodDetector.fit(train, side=16, components=4).with_threshold(val, 0.05)
    assert refused(detector, val) == pytest.approx(0.05, abs=0.01)
    assert detector.false_refusal == 0.05
    loaded = OodDetector.load(detector.save(tmp_path / "ood.npz"))
    np.testing.assert_allclose(loaded.scores(val[:20]), detector.scores(val[:20]), rtol=1e-6)
    assert loaded.threshold == pytest.approx(detector.threshold)
    assert OodDetector.from_dict(loaded.to_dict()).threshold == pytest.approx(detector.threshold)
    with pytest.raises(ValueError, match="more than 4 training images"):
        OodDetector.fit(train[:3], side=16, components=4)
