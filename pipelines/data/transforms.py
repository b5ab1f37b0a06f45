"""Image transforms as pure functions over numpy batches (albumentations), shared by Ray Data's
``map_batches``, evaluation and the Serve router. This module never imports ray.

Train: resize, small rotation/scale, brightness/contrast, optional CLAHE. Eval: resize only. Both return
uint8 batches ``[N, 1, H, W]``: a quarter of the bytes of float32 through Ray's object store and into the
trainer; the models normalise on their own device with the mean and std they store in every checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.labels import NIH14
from pipelines.config import Config
from pipelines.data.imaging import decode_stored

SOURCE_IDS = {"nih": 0, "covid": 1}


@dataclass(frozen=True)
class TransformSpec:
    """What the transforms depend on: the model's input size and the augmentation settings. Small, hashable and
    picklable: it is what Ray ships to every ``map_batches`` task, and the key of the per-process transform cache."""

    input_size: int
    rotate_limit: float = 0.0
    scale_limit: float = 0.0
    brightness_limit: float = 0.0
    contrast_limit: float = 0.0
    clahe: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> TransformSpec:
        return cls(cfg.model.input_size, **cfg.data.augment.model_dump())


def build_transform(spec: TransformSpec, train: bool) -> A.Compose:
    """The albumentations pipeline on uint8 grayscale images (normalisation happens batch-wise after)."""
    size, aug = spec.input_size, spec
    ops: list[A.BasicTransform] = [A.Resize(size, size, interpolation=cv2.INTER_AREA)]
    if train:
        ops += [
            A.Affine(
                rotate=(-aug.rotate_limit, aug.rotate_limit),
                scale=(1 - aug.scale_limit, 1 + aug.scale_limit),
                border_mode=cv2.BORDER_CONSTANT,
                p=0.8,
            ),
            A.RandomBrightnessContrast(aug.brightness_limit, aug.contrast_limit, p=0.8),
        ]
        if aug.clahe:
            ops.append(A.CLAHE(clip_limit=2.0, p=0.5))
    return A.Compose(ops)


@functools.lru_cache(maxsize=8)
def _cached_transform(spec: TransformSpec, train: bool) -> A.Compose:
    return build_transform(spec, train)


def transform_images(images: Sequence[np.ndarray], transform: A.Compose) -> np.ndarray:
    """Apply ``transform`` to decoded grayscale uint8 images: uint8 ``[N, 1, H, W]``, as the models take them."""
    return np.stack([transform(image=image)["image"] for image in images])[:, None, :, :]


def labels_from_table(table: pa.Table) -> dict[str, np.ndarray]:
    """Both label sets with the source of each row; labels a row's source does not have are filled, not faked.

    ``nih_labels`` is zeros on COVID rows and ``covid_label`` is -1 on NIH rows; losses mask by ``source``.
    """
    n = table.num_rows
    source = np.array([SOURCE_IDS[s] for s in table.column("source").to_pylist()], dtype=np.int64)
    nih = np.zeros((n, len(NIH14)), dtype=np.float32)
    nih_column = table.column("nih_labels").combine_chunks()
    present = ~nih_column.is_null().to_numpy(zero_copy_only=False)
    if present.any():
        values = pc.list_flatten(nih_column).to_numpy(zero_copy_only=False)
        nih[present] = values.reshape(-1, len(NIH14))
    covid = pc.fill_null(table.column("covid_label"), -1).to_numpy().astype(np.int64)
    return {"source": source, "nih_labels": nih, "covid_label": covid}


def preprocess_table(table: pa.Table, spec: TransformSpec, train: bool) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: shard rows (stored image bytes + labels) -> model-ready numpy arrays."""
    transform = _cached_transform(spec, train)
    images = [decode_stored(data) for data in table.column("image").to_pylist()]
    return {"image": transform_images(images, transform), **labels_from_table(table)}
