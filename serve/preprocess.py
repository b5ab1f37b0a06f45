"""The image a model sees at serving time, built exactly as evaluation built it, from checkpoint metadata.

Evaluation reads images ingest stored: ``decode_gray`` -> ``resize_square(storage_size)`` (Pillow, area-averaging
when shrinking) -> PNG; then the evaluation transform (``build_transform(spec, train=False)``: albumentations
``Resize(input_size, INTER_AREA)``). A served full-size image therefore goes through the same two resizes: the
first to the storage size the model was trained on (from the checkpoint's config), then the evaluation transform
at the checkpoint's input size. Resizing straight to the input size would be one resize instead of two and
slightly different pixels from the ones the model was validated on.
"""

from __future__ import annotations

import numpy as np

from models.checkpoint import PreprocessSpec
from pipelines.data.imaging import resize_square
from pipelines.data.transforms import TransformSpec, build_transform, transform_images


class Preprocessor:
    """grayscale uint8 [H, W] of any size -> uint8 [1, input_size, input_size], the model's input."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        # the evaluation transform depends only on the input size; built through the same function
        self._transform = build_transform(TransformSpec(spec.input_size), train=False)

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        stored = resize_square(gray, self.spec.storage_size)
        return transform_images([stored], self._transform)[0]
