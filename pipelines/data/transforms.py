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

from models import metadata as patient_metadata
from models.labels import LabelSpace, label_key
from pipelines.config import Config
from pipelines.data.imaging import decode_stored


@dataclass(frozen=True)
class TransformSpec:
    """What the transforms depend on: the model's input size, the augmentation settings and the label spaces of
    the model's heads (in head order; the labels each batch carries). Small, hashable and picklable: it is what Ray
    ships to every ``map_batches`` task, and the key of the per-process transform cache."""

    input_size: int
    label_spaces: tuple[LabelSpace, ...] = ()
    rotate_limit: float = 0.0
    scale_limit: float = 0.0
    brightness_limit: float = 0.0
    contrast_limit: float = 0.0
    clahe: bool = False

    @classmethod
    def from_config(cls, cfg: Config, label_spaces: tuple[LabelSpace, ...] = ()) -> TransformSpec:
        return cls(cfg.model.input_size, tuple(label_spaces), **cfg.data.augment.model_dump())


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


def labels_from_table(table: pa.Table, spaces: tuple[LabelSpace, ...]) -> dict[str, np.ndarray]:
    """Each row's ``source`` as its index into ``spaces`` and, per head, the labels in ``label_key(head)``.

    A row's labels fill its own head only: the others get zeros (multi-label) or -1 (multi-class), filled, not
    faked; the losses and metrics mask by ``source``. A row of a source no head is for fails here, by name.
    """
    index_of = {space.source: i for i, space in enumerate(spaces)}
    names = table.column("source").to_pylist()
    unknown = sorted(set(names) - set(index_of))
    if unknown:
        raise ValueError(f"shard rows of source {unknown} but the model's heads are for {list(index_of)}")
    source = np.array([index_of[name] for name in names], dtype=np.int64)
    labels = table.column("labels").to_pylist()
    out = {"source": source}
    for i, space in enumerate(spaces):
        rows = np.flatnonzero(source == i)
        if space.multi_label:
            values = np.zeros((len(names), len(space.classes)), dtype=np.float32)
            if len(rows):
                values[rows] = np.asarray([labels[r] for r in rows], dtype=np.float32)
        else:
            values = np.full(len(names), -1, dtype=np.int64)
            values[rows] = [labels[r][0] for r in rows]
        out[label_key(space.head)] = values
    return out


def preprocess_table(table: pa.Table, spec: TransformSpec, train: bool) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: shard rows (stored image bytes + labels) -> model-ready numpy arrays."""
    transform = _cached_transform(spec, train)
    images = [decode_stored(data) for data in table.column("image").to_pylist()]
    arrays = {"image": transform_images(images, transform)}
    if spec.label_spaces:
        arrays |= labels_from_table(table, spec.label_spaces)
        arrays["metadata"] = metadata_from_table(table)
    return arrays


def metadata_from_table(table: pa.Table) -> np.ndarray:
    """``[N, F]`` float32 patient metadata for the fusion head (``models/metadata.py``); absent columns and null
    cells (COVID and pneumonia rows) count as missing."""
    columns = [table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
               for name in ("age", "sex", "view_position")]  # fmt: skip
    return patient_metadata.encode_rows(*columns)
