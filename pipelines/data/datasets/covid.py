"""The COVID-19 Radiography Database: 21,165 PNGs (299 px) in one folder per class (multi-class).

Layout: ``COVID-19_Radiography_Dataset/<class>/images/*.png`` (version 4, beside ``masks/``) or ``<class>/*.png``
(version 3, which has no Lung_Opacity). Split rule: class-stratified and seeded; the database has no patient ids, so
each image is its own group. Its Normal and Lung_Opacity images come from RSNA, whose images come from NIH: ingest's
twin search keeps such copies in the NIH image's split.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.labels import LabelSpace
from pipelines.data.datasets.base import (
    IMAGE_SUFFIXES,
    Dataset,
    DatasetLayoutError,
    Listing,
    image_row,
    is_image_candidate,
)

SOURCE = "covid"
# Folder names of version 4. Older 3-class releases lack Lung_Opacity; the label space follows the download.
COVID_CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
DATASET_FOLDER = "COVID-19_Radiography_Dataset"
LABEL_SPACE = LabelSpace("covid", SOURCE, COVID_CLASSES, multi_label=False)


def dataset_root(root: str | Path) -> Path:
    """Accept either the folder holding ``COVID-19_Radiography_Dataset`` or that folder itself."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"COVID root {root} does not exist; expected {DATASET_FOLDER}/<class>/images/")
    return root / DATASET_FOLDER if (root / DATASET_FOLDER).is_dir() else root


def _covid_class_files(class_dir: Path) -> list[Path]:
    """Version 4 keeps images in ``<class>/images/`` (beside ``masks/``); version 3 keeps them in ``<class>/``."""
    folder = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
    return sorted(p for p in folder.iterdir() if is_image_candidate(p))


def list_covid(root: str | Path) -> Listing:
    """List a COVID-19 Radiography Database root: one folder per class, images inside."""
    dataset = dataset_root(root)
    class_dirs = sorted(p for p in dataset.iterdir() if p.is_dir() and not p.name.startswith("."))
    present = tuple(name for name in COVID_CLASSES if (dataset / name).is_dir())
    if not present:
        raise DatasetLayoutError(
            f"{dataset}: no class folders; expected some of {', '.join(COVID_CLASSES)} with images/ inside"
        )
    listing = Listing(SOURCE, dataset, classes=present)
    for class_dir in class_dirs:
        for path in _covid_class_files(class_dir):
            relpath = path.relative_to(dataset).as_posix()
            if class_dir.name not in present:
                listing.reject(relpath, "bad_label", f"folder {class_dir.name!r} is not a COVID-19 Radiography class")
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                listing.reject(relpath, "wrong_type", f"unsupported file type {path.suffix or '(none)'}")
            else:
                listing.rows.append(_covid_row(path, relpath, present.index(class_dir.name)))
    if not listing.rows and not listing.rejects:
        raise DatasetLayoutError(f"{dataset}: class folders hold no images")
    return listing


def _covid_row(path: Path, relpath: str, label: int) -> dict[str, Any]:
    # the database has no patient ids: each image is its own group
    return image_row(path, relpath, SOURCE, f"covid-{path.stem}", [label])


def covid_splits(
    rows: Iterable[dict[str, Any]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Class-stratified random split, seeded per class."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for row in rows:
        by_class[row["labels"][0]].append(row["relpath"])
    split_of = {}
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        order = np.random.default_rng([seed, label]).permutation(len(paths))
        n_test, n_val = round(test_fraction * len(paths)), round(val_fraction * len(paths))
        for rank, index in enumerate(order):
            split_of[paths[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split_of


DATASET = Dataset(
    source=SOURCE,
    rank=1,
    title="COVID-19 Radiography Database",
    label_space=LABEL_SPACE,
    list_files=lambda root: list_covid(root),
    assign_splits=lambda rows, data: covid_splits(
        rows, data.covid_val_fraction, data.covid_test_fraction, data.split_seed
    ),
    root=lambda data: data.covid_dir,
    cli_flag="--covid",
)
