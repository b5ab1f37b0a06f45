"""Out-of-distribution score: how far an image lies from the training split's radiographs, before any model answers.

The image (grayscale uint8, any size, as decoded) is area-resized to ``side`` x ``side`` and standardised (zero mean,
unit spread), so brightness does not count, only layout. A linear autoencoder (PCA with ``components`` components,
fitted on training images) describes that layout; an image is scored by three distances, each divided by its 99th
percentile on the fitting images and then summed:

- ``Q``: what the components cannot reconstruct (the autoencoder's reconstruction error, as torchxrayvision's
  autoencoder check does, here linear);
- ``T2``: Mahalanobis distance within the components (a layout the training images have, pushed too far);
- ``C``: how far the image's contrast (log of its spread at that size) is from the training images', in standard
  deviations, squared: a blank, tiny or fine-noise image has almost no spread left once resized, and standardising
  alone would make it look like an average layout.

The threshold is the score's ``1 - false_refusal`` quantile on the validation split: past it, the answer is a
refusal. Chosen by measurement over a Mahalanobis distance on the CNN's pooled features (benchmarks/RESULTS.md,
"Out-of-distribution refusal"): it separates every negative kind at least as well, needs no model forward, so it
runs in the router before the models are asked, and costs about 0.1 ms an image.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SPREAD_FLOOR = 2.0  # grey levels: a flat image standardises to zeros instead of amplified noise
SCALE_QUANTILE = 0.99  # each distance is divided by this quantile of it on the fitting images


def layout(images: Iterable[np.ndarray], side: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 ``[N, side * side]``: each image area-resized and standardised, float32 ``[N]``: log of its spread)."""
    rows, contrast = [], []
    for image in images:
        small = cv2.resize(np.asarray(image, np.uint8), (side, side), interpolation=cv2.INTER_AREA)
        small = small.astype(np.float32)
        spread = float(small.std())
        rows.append(((small - small.mean()) / (spread + SPREAD_FLOOR)).ravel())
        contrast.append(np.log1p(spread))
    if not rows:
        return np.zeros((0, side * side), np.float32), np.zeros(0, np.float32)
    return np.stack(rows), np.asarray(contrast, np.float32)


def threshold_at(scores: np.ndarray, false_refusal: float) -> float:
    """The score past which ``false_refusal`` of ``scores`` lie, rounded up to an observed score (so at most that
    share is refused); inf for no scores."""
    return float(np.quantile(scores, 1.0 - false_refusal, method="higher")) if len(scores) else float("inf")


@dataclass(frozen=True)
class OodDetector:
    side: int
    mean: np.ndarray  # [D]
    components: np.ndarray  # [K, D], orthonormal rows
    variances: np.ndarray  # [K], the training images' variance along each component
    contrast_mean: float  # mean and standard deviation of the training images' log spread
    contrast_std: float
    q_scale: float
    t2_scale: float
    c_scale: float
    threshold: float = float("inf")  # from ``with_threshold``; inf: refuses nothing
    false_refusal: float | None = None  # the validation refusal rate the threshold was set for

    @classmethod
    def fit(cls, images: Iterable[np.ndarray], side: int = 16, components: int = 8) -> OodDetector:
        from sklearn.decomposition import PCA

        x, contrast = layout(images, side)
        if len(x) <= components:
            raise ValueError(f"the OOD check needs more than {components} training images, got {len(x)}")
        pca = PCA(components, random_state=0).fit(x)
        unscaled = cls(
            side, pca.mean_.astype(np.float32), pca.components_.astype(np.float32),
            pca.explained_variance_.astype(np.float32), float(contrast.mean()), float(contrast.std() + 1e-6),
            1.0, 1.0, 1.0,
        )  # fmt: skip
        scales = [float(np.quantile(d, SCALE_QUANTILE)) + 1e-12 for d in unscaled.distances(x, contrast)]
        return replace(unscaled, q_scale=scales[0], t2_scale=scales[1], c_scale=scales[2])

    def distances(self, x: np.ndarray, contrast: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Q, T2, C) of layout rows ``x`` and their log spreads, unscaled."""
        centred = x - self.mean
        codes = centred @ self.components.T
        residual = centred - codes @ self.components
        c = ((contrast - self.contrast_mean) / self.contrast_std) ** 2
        return (residual**2).mean(axis=1), (codes**2 / self.variances).sum(axis=1), c

    def scores(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """One score per image: 0 on the training layout, about 3 at the fitting images' 99th percentiles."""
        q, t2, c = self.distances(*layout(images, self.side))
        return q / self.q_scale + t2 / self.t2_scale + c / self.c_scale

    def score(self, image: np.ndarray) -> float:
        return float(self.scores([image])[0])

    def with_threshold(self, validation: Iterable[np.ndarray], false_refusal: float) -> OodDetector:
        """The same detector refusing ``false_refusal`` of the validation images (their highest scores)."""
        return replace(
            self, threshold=threshold_at(self.scores(validation), false_refusal), false_refusal=float(false_refusal)
        )

    def refuses(self, score: float) -> bool:
        return score > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OodDetector:
        arrays = {name: np.asarray(values[name], np.float32) for name in ("mean", "components", "variances")}
        names = ("contrast_mean", "contrast_std", "q_scale", "t2_scale", "c_scale", "threshold")
        scalars = {name: float(values[name]) for name in names}
        refusal = values.get("false_refusal")
        return cls(int(values["side"]), **arrays, **scalars, false_refusal=None if refusal is None else float(refusal))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        values = {k: (np.nan if v is None else v) for k, v in self.to_dict().items()}
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as handle:
            np.savez(handle, **values)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OodDetector:
        with np.load(path) as stored:
            values = {name: stored[name] for name in stored.files}
        refusal = float(values["false_refusal"])
        return cls.from_dict({**values, "false_refusal": None if refusal != refusal else refusal})
