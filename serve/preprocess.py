"""The image a model sees at serving time, built exactly as evaluation built it, from checkpoint metadata.

Evaluation reads images ingest stored: ``decode_gray`` -> ``resize_square(storage_size)`` (Pillow, area-averaging
when shrinking) -> PNG; then the evaluation transform (``build_transform(cfg, train=False)``: albumentations
``Resize(input_size, INTER_AREA)``). A served full-size image therefore goes through the same two resizes: the
first to the storage size the model was trained on (from the checkpoint's config), then the evaluation transform
at the checkpoint's input size. Resizing straight to the input size would be one resize instead of two and
slightly different pixels from the ones the model was validated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import Config
from pipelines.imaging import resize_square
from pipelines.transforms import build_transform, transform_images


@dataclass(frozen=True)
class PreprocessSpec:
    storage_size: int
    input_size: int

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any]) -> PreprocessSpec:
        """From a checkpoint's ``meta.json`` / payload: input size from ``preprocessing``, storage size from the
        training config (the default of the config schema if a checkpoint predates that key)."""
        input_size = int(meta["preprocessing"]["input_size"])
        storage = (meta.get("config") or {}).get("data", {}).get("storage_size")
        return cls(int(storage or Config().data.storage_size), input_size)


class Preprocessor:
    """grayscale uint8 [H, W] of any size -> uint8 [1, input_size, input_size], the model's input."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        # The evaluation transform depends only on model.input_size; build it through the same function.
        cfg = Config.model_validate({"model": {"input_size": spec.input_size}})
        self._transform = build_transform(cfg, train=False)

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        stored = resize_square(gray, self.spec.storage_size)
        return transform_images([stored], self._transform)[0]
