"""Kermany's pediatric "Chest X-Ray Images (Pneumonia)" set: layout reader, label space and split rule.

The download unpacks to ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (5,856 JPEGs, RGB or grayscale,
of varying size). Labels and patients come from the file names: ``person<P>_bacteria_<N>.jpeg`` and
``person<P>_virus_<N>.jpeg`` in PNEUMONIA, ``IM-<NNNN>-<MMMM>.jpeg`` and ``NORMAL2-IM-<NNNN>-<MMMM>[-<K>].jpeg`` in
NORMAL. The official ``val`` folder holds only 16 images, so it joins ``train`` and validation is a patient-grouped
split of that pool; the official ``test`` stays the test split. A folder of class folders without split folders
(like a sample of the set) is one pool, from which test is carved by patient too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.labels import LabelError, LabelSpace
from pipelines.data.datasets.base import IMAGE_SUFFIXES, Dataset, DatasetLayoutError, Listing, image_row

SOURCE = "pneumonia"
CLASSES: tuple[str, ...] = ("normal", "bacterial", "viral")
# softmax over the three; the binary normal-vs-pneumonia answer is P(bacterial) + P(viral)
LABEL_SPACE = LabelSpace("pneumonia", SOURCE, CLASSES, multi_label=False, binary="pneumonia", negatives=("normal",))
DATASET_FOLDER = "chest_xray"
CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
OFFICIAL_SPLITS = {"train": "train_val", "val": "train_val", "test": "test"}

_PNEUMONIA_NAME = re.compile(r"^person(?P<patient>\d+)_(?P<kind>bacteria|virus)_\d+$", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"^(?P<patient>(?:NORMAL2-)?IM-\d+)-\d+(?:-\d+)?$", re.IGNORECASE)


def parse_file_name(name: str, folder: str) -> tuple[str, int]:
    """(patient id, class index) of a file named as in the dataset, found in class folder ``folder``.

    Normal images carry no patient id; the ``IM-<NNNN>`` part names the study, which serves as the group.
    """
    stem = Path(name).stem
    if folder.upper() == "PNEUMONIA":
        match = _PNEUMONIA_NAME.match(stem)
        if not match:
            raise LabelError(f"{name!r} in PNEUMONIA is not named person<P>_bacteria_<N> or person<P>_virus_<N>")
        kind = CLASSES.index("bacterial" if match["kind"].lower() == "bacteria" else "viral")
        return f"pneumonia-person{int(match['patient'])}", kind
    if folder.upper() == "NORMAL":
        match = _NORMAL_NAME.match(stem)
        if not match:
            raise LabelError(f"{name!r} in NORMAL is not named IM-<NNNN>-<MMMM> or NORMAL2-IM-<NNNN>-<MMMM>")
        return f"pneumonia-{match['patient'].upper()}", CLASSES.index("normal")
    raise LabelError(f"folder {folder!r} is not one of {', '.join(CLASS_FOLDERS)}")


def dataset_root(root: str | Path) -> Path:
    """Accept the folder holding ``chest_xray``, ``chest_xray`` itself, or a folder of the two class folders."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"pneumonia root {root} does not exist; expected {DATASET_FOLDER}/<split>/<class>/")
    return root / DATASET_FOLDER if (root / DATASET_FOLDER).is_dir() else root


def list_pneumonia(root: str | Path) -> Listing:
    """List the set: one row per image with its class, patient and official split; the rest as rejects."""
    dataset = dataset_root(root)
    split_dirs = [dataset / split for split in OFFICIAL_SPLITS if (dataset / split).is_dir()]
    pools = [(d, OFFICIAL_SPLITS[d.name]) for d in split_dirs] or [(dataset, "train_val")]
    listing = Listing(SOURCE, dataset, classes=CLASSES)
    for folder, official in pools:
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not any(d.name.upper() in CLASS_FOLDERS for d in class_dirs):
            raise DatasetLayoutError(f"{folder}: no NORMAL or PNEUMONIA folder")
        for class_dir in class_dirs:
            for path in sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
                relpath = path.relative_to(dataset).as_posix()
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    listing.reject(relpath, "wrong_type", f"unsupported file type {path.suffix or '(none)'}")
                    continue
                try:
                    patient, label = parse_file_name(path.name, class_dir.name)
                except LabelError as err:
                    listing.reject(relpath, "bad_label", str(err))
                    continue
                listing.rows.append(_row(path, relpath, patient, label, official))
    if not listing.rows and not listing.rejects:
        raise DatasetLayoutError(f"{dataset}: the class folders hold no images")
    return listing


def _row(path: Path, relpath: str, patient: str, label: int, official: str) -> dict[str, Any]:
    return image_row(path, relpath, SOURCE, patient, [label], official_split=official)


def pneumonia_splits(
    rows: Iterable[dict[str, Any]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """The official test stays test; a seeded, patient-grouped fraction of the rest is val (and, when the layout
    has no official test, another such fraction is test). No patient is on two sides."""
    rows = list(rows)
    has_test = any(r["official_split"] == "test" for r in rows)
    pool = sorted({r["patient_id"] for r in rows if r["official_split"] != "test"})
    order = np.random.default_rng([seed, 3]).permutation(len(pool))
    n_test = 0 if has_test else round(test_fraction * len(pool))
    n_val = round(val_fraction * len(pool))
    held = {pool[i]: ("test" if rank < n_test else "val") for rank, i in enumerate(order[: n_test + n_val])}
    return {r["relpath"]: "test" if r["official_split"] == "test" else held.get(r["patient_id"], "train") for r in rows}


DATASET = Dataset(
    source=SOURCE,
    rank=2,
    title="Chest X-Ray Images (Pneumonia), Kermany et al.",
    label_space=LABEL_SPACE,
    list_files=lambda root: list_pneumonia(root),
    # no official test in a folder of class folders alone: then val_fraction of the patients is test as well
    assign_splits=lambda rows, data: pneumonia_splits(rows, data.val_fraction, data.val_fraction, data.split_seed),
    root=lambda data: data.pneumonia_root,
    required=False,
    cli_flag="--pneumonia",
)
