"""The dataset registry: one module per dataset in this package, each declaring ``DATASET`` (``base.Dataset``).

Ingest, training, evaluation and the synthetic writer loop over ``DATASETS``; the heads a model gets are the label
spaces of the datasets its shards hold (the manifest lists them, every checkpoint stores them), so serving and
export never name a dataset either. Adding a dataset is adding a module here (and its tests); it is found by
scanning this package, ordered by its ``rank``.
"""

from __future__ import annotations

import importlib
import pkgutil

from models.labels import LabelSpace
from pipelines.data.datasets.base import Dataset, DatasetLayoutError, Listing

__all__ = ["DATASETS", "Dataset", "DatasetLayoutError", "Listing", "default_label_spaces"]


def _discover() -> dict[str, Dataset]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        declared = getattr(module, "DATASET", None)
        if not isinstance(declared, Dataset):
            raise TypeError(f"{module.__name__} declares no DATASET (a pipelines.data.datasets.base.Dataset)")
        found.append(declared)
    found.sort(key=lambda d: d.rank)
    for field in ("source", "rank"):
        values = [getattr(d, field) for d in found]
        if len(set(values)) != len(values):
            raise ValueError(f"two datasets share a {field}: {values}")
    return {d.source: d for d in found}


DATASETS: dict[str, Dataset] = _discover()


def default_label_spaces() -> tuple[LabelSpace, ...]:
    """Every registered dataset's label space in rank order: the heads of a model built without a manifest."""
    return tuple(d.label_space for d in DATASETS.values())
