"""Readers for the on-disk layouts of NIH ChestX-ray14 and the COVID-19 Radiography Database.

They list image files with their labels and metadata as plain dict rows (no pixels are read here) and
turn everything that cannot become a training row into a reject with a reason, so ingest loses nothing.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import CxrError
from models.labels import COVID_CLASSES, COVID_DATASET_FOLDER, LabelError, parse_nih_labels

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIH_CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv")
NIH_REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID")
NIH_SPLIT_LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}


class DatasetLayoutError(CxrError, FileNotFoundError):
    """A dataset root is missing or does not look like the layout it should have."""


@dataclass
class Listing:
    """Files of one source: rows ready for decoding, rejects with reasons, and bookkeeping."""

    source: str
    root: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)
    missing_images: int = 0  # CSV rows whose image is not on disk (a partial download)
    classes: tuple[str, ...] = ()

    def reject(self, relpath: str, reason: str, detail: str = "") -> None:
        self.rejects.append({"source": self.source, "relpath": relpath, "reason": reason, "detail": detail})


def _is_image_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".")


# ------------------------------------------------------------------------------------------------ NIH


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
        yield from sorted(p for p in folder.iterdir() if _is_image_candidate(p))


def _parse_age(value: str) -> int | None:
    digits = str(value).strip().rstrip("YMDymd")  # the 2017 release writes ages as "058Y"
    return int(digits) if digits.isdigit() else None


def _nih_row(path: Path, relpath: str, entry: dict[str, str], split: str, labels: list[int]) -> dict[str, Any]:
    width, height = entry.get("OriginalImage[Width"), entry.get("Height]")
    return {
        "path": str(path),
        "relpath": relpath,
        "source": "nih",
        "patient_id": f"nih-{int(entry['Patient ID']):08d}",
        "official_split": split,
        "nih_labels": labels,
        "covid_label": None,
        "view_position": (entry.get("View Position") or "").strip() or None,
        "age": _parse_age(entry.get("Patient Age", "")),
        "sex": (entry.get("Patient Gender") or "").strip() or None,
        "original_width": int(width) if width and width.strip().isdigit() else None,
        "original_height": int(height) if height and height.strip().isdigit() else None,
    }


def list_nih(root: str | Path) -> Listing:
    """List an NIH ChestX-ray14 root: label CSV, official split lists and the image folders."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"NIH root {root} does not exist; expected images_*/images/*.png and a label CSV")
    entries = read_nih_csv(_find_nih_csv(root))
    split_of = _read_split_lists(root)
    listing = Listing("nih", root)
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


# ---------------------------------------------------------------------------------------------- COVID


def covid_dataset_root(root: str | Path) -> Path:
    """Accept either the folder holding ``COVID-19_Radiography_Dataset`` or that folder itself."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"COVID root {root} does not exist; expected {COVID_DATASET_FOLDER}/<class>/images/")
    return root / COVID_DATASET_FOLDER if (root / COVID_DATASET_FOLDER).is_dir() else root


def _covid_class_files(class_dir: Path) -> list[Path]:
    """Version 4 keeps images in ``<class>/images/`` (beside ``masks/``); version 3 keeps them in ``<class>/``."""
    folder = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
    return sorted(p for p in folder.iterdir() if _is_image_candidate(p))


def list_covid(root: str | Path) -> Listing:
    """List a COVID-19 Radiography Database root: one folder per class, images inside."""
    dataset = covid_dataset_root(root)
    class_dirs = sorted(p for p in dataset.iterdir() if p.is_dir() and not p.name.startswith("."))
    present = tuple(name for name in COVID_CLASSES if (dataset / name).is_dir())
    if not present:
        raise DatasetLayoutError(
            f"{dataset}: no class folders; expected some of {', '.join(COVID_CLASSES)} with images/ inside"
        )
    listing = Listing("covid", dataset, classes=present)
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
    return {
        "path": str(path),
        "relpath": relpath,
        "source": "covid",
        "patient_id": f"covid-{path.stem}",  # the database has no patient ids: each image is its own group
        "official_split": None,
        "nih_labels": None,
        "covid_label": label,
        "view_position": None,
        "age": None,
        "sex": None,
        "original_width": None,
        "original_height": None,
    }


def write_rejects(path: Path, rejects: list[dict[str, str]]) -> None:
    """The rejects manifest: one CSV line per input file that did not become a row, with its reason."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["source", "relpath", "reason", "detail"])
    writer.writeheader()
    writer.writerows(rejects)
    path.write_text(buffer.getvalue())
