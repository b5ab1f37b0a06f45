"""NIH ChestX-ray14: 112,120 frontal radiographs of 30,805 patients, 14 findings (multi-label).

Layout: ``images_NNN/images/*.png`` (the twelve archives; a flat ``images/`` is taken too), the label CSV
``Data_Entry_2017[_v2020].csv`` (gzipped too) and the official ``train_val_list.txt`` / ``test_list.txt``. Split
rule: the official test list is test; a seeded, patient-grouped fraction of train_val is validation, so no
patient's follow-up images land on two sides.
"""

from __future__ import annotations

import csv
import gzip
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from models.labels import LabelError, LabelSpace
from pipelines.data.datasets.base import (
    IMAGE_SUFFIXES,
    Dataset,
    DatasetLayoutError,
    Listing,
    image_row,
    is_image_candidate,
)

log = logging.getLogger(__name__)

SOURCE = "nih"
# The NIH order used by the dataset paper and every model trained on it.
NIH14: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
LABEL_SPACE = LabelSpace("nih14", SOURCE, NIH14, multi_label=True, binary="abnormal")
NIH_CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv")
NIH_REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID")
NIH_SPLIT_LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}


def parse_nih_labels(finding_labels: str) -> list[int]:
    """Turn a ``Finding Labels`` cell (``"Effusion|Mass"`` or ``"No Finding"``) into 14 zeros and ones."""
    names = [name.strip() for name in str(finding_labels).split("|") if name.strip()]
    if not names:
        raise LabelError("empty 'Finding Labels'")
    vector = [0] * len(NIH14)
    for name in names:
        if name == NO_FINDING:
            continue
        if name not in NIH14:
            raise LabelError(f"finding {name!r} is not one of the 14 NIH findings")
        vector[NIH14.index(name)] = 1
    if NO_FINDING in names and any(vector):
        raise LabelError(f"'{NO_FINDING}' combined with findings in {finding_labels!r}")
    return vector


def format_nih_labels(vector: Iterable[int]) -> str:
    """Inverse of ``parse_nih_labels``: the ``|``-joined finding names, or ``No Finding``."""
    names = [name for name, flag in zip(NIH14, vector, strict=True) if flag]
    return "|".join(names) if names else NO_FINDING


def _find_nih_csv(root: Path) -> Path:
    for name in NIH_CSV_NAMES:
        if (root / name).is_file():
            return root / name
    raise DatasetLayoutError(f"{root}: no label CSV found; expected one of {', '.join(NIH_CSV_NAMES)}")


def read_nih_csv(path: Path) -> dict[str, dict[str, str]]:
    """Rows of ``Data_Entry_2017*.csv`` keyed by image name (handles the 2017 and 2020 releases, gzipped too)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in NIH_REQUIRED_COLUMNS if name not in (reader.fieldnames or [])]
        if missing:
            raise DatasetLayoutError(f"{path}: missing columns {missing}; found {reader.fieldnames}")
        return {row["Image Index"].strip(): row for row in reader}


def _read_split_lists(root: Path) -> dict[str, str]:
    split_of: dict[str, str] = {}
    for split, name in NIH_SPLIT_LISTS.items():
        path = root / name
        if not path.is_file():
            raise DatasetLayoutError(f"{root}: missing the official split list {name}")
        for line in path.read_text().splitlines():
            if line.strip():
                split_of[line.strip()] = split
    return split_of


def _nih_image_files(root: Path) -> Iterator[Path]:
    """Images under ``images_NNN/images/`` (the archives) or a flat ``images/`` folder."""
    folders = sorted(root.glob("images_*/images")) + ([root / "images"] if (root / "images").is_dir() else [])
    for folder in folders:
        yield from sorted(p for p in folder.iterdir() if is_image_candidate(p))


def _parse_age(value: str) -> int | None:
    digits = str(value).strip().rstrip("YMDymd")  # the 2017 release writes ages as "058Y"
    return int(digits) if digits.isdigit() else None


def _nih_row(path: Path, relpath: str, entry: dict[str, str], split: str, labels: list[int]) -> dict[str, Any]:
    width, height = entry.get("OriginalImage[Width"), entry.get("Height]")
    return image_row(
        path,
        relpath,
        SOURCE,
        f"nih-{int(entry['Patient ID']):08d}",
        labels,
        official_split=split,
        view_position=(entry.get("View Position") or "").strip() or None,
        age=_parse_age(entry.get("Patient Age", "")),
        sex=(entry.get("Patient Gender") or "").strip() or None,
        original_width=int(width) if width and width.strip().isdigit() else None,
        original_height=int(height) if height and height.strip().isdigit() else None,
    )


def list_nih(root: str | Path) -> Listing:
    """List an NIH ChestX-ray14 root: label CSV, official split lists and the image folders."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"NIH root {root} does not exist; expected images_*/images/*.png and a label CSV")
    entries = read_nih_csv(_find_nih_csv(root))
    split_of = _read_split_lists(root)
    listing = Listing(SOURCE, root, classes=NIH14)
    found: set[str] = set()
    for path in _nih_image_files(root):
        relpath = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            listing.reject(relpath, "wrong_type", f"unsupported file type {path.suffix or '(none)'}")
            continue
        entry = entries.get(path.name)
        if entry is None:
            listing.reject(relpath, "not_in_csv", f"{path.name} has no row in the label CSV")
            continue
        found.add(path.name)
        if path.name not in split_of:
            listing.reject(relpath, "not_in_split_lists", "in neither train_val_list.txt nor test_list.txt")
            continue
        try:
            labels = parse_nih_labels(entry["Finding Labels"])
        except LabelError as err:
            listing.reject(relpath, "bad_label", str(err))
            continue
        listing.rows.append(_nih_row(path, relpath, entry, split_of[path.name], labels))
    listing.missing_images = len(entries) - len(found)
    if not listing.rows and not listing.rejects:
        raise DatasetLayoutError(f"{root}: no images found under images_*/images/ or images/")
    if listing.missing_images:
        log.info(
            "NIH: %d of %d CSV rows have no image on disk (partial download?)", listing.missing_images, len(entries)
        )
    return listing


def nih_splits(rows: Iterable[dict[str, Any]], val_fraction: float, seed: int) -> dict[str, str]:
    """Official ``test_list.txt`` is test; a seeded, patient-grouped fraction of train_val is val."""
    rows = list(rows)
    train_val_patients = sorted({r["patient_id"] for r in rows if r["official_split"] == "train_val"})
    order = np.random.default_rng(seed).permutation(len(train_val_patients))
    val_patients = {train_val_patients[i] for i in order[: round(val_fraction * len(train_val_patients))]}
    return {
        r["relpath"]: "test" if r["official_split"] == "test" else "val" if r["patient_id"] in val_patients else "train"
        for r in rows
    }


DATASET = Dataset(
    source=SOURCE,
    rank=0,
    title="NIH ChestX-ray14",
    label_space=LABEL_SPACE,
    list_files=lambda root: list_nih(root),
    assign_splits=lambda rows, data: nih_splits(rows, data.val_fraction, data.split_seed),
    root=lambda data: data.nih_dir,
    cli_flag="--nih",
)
