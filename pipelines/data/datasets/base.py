"""What a dataset module declares (``Dataset``), and what its layout reader returns (``Listing``).

A reader lists image files with their labels and metadata as plain dict rows (no pixels are read) and turns
everything that cannot become a training row into a reject with a reason, so ingest loses nothing. Every row has
the same keys: ``path``, ``relpath``, ``source``, ``patient_id``, ``official_split`` ("train_val", "test" or None),
``labels`` (the 0/1 vector of a multi-label space, or ``[class index]``), ``view_position``, ``age``, ``sex``,
``original_width`` and ``original_height`` (None where the dataset has no such field).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import CxrError
from models.labels import LabelSpace

if TYPE_CHECKING:
    from pipelines.config.data import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
REJECT_COLUMNS = ["source", "relpath", "reason", "detail"]


class DatasetLayoutError(CxrError, FileNotFoundError):
    """A dataset root is missing or does not look like the layout it should have."""


@dataclass
class Listing:
    """Files of one source: rows ready for decoding, rejects with reasons, and bookkeeping."""

    source: str
    root: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)
    missing_images: int = 0  # label-file rows whose image is not on disk (a partial download)
    classes: tuple[str, ...] = ()  # the classes this download has (a multi-class space may lack some)

    def reject(self, relpath: str, reason: str, detail: str = "") -> None:
        self.rejects.append({"source": self.source, "relpath": relpath, "reason": reason, "detail": detail})


def image_row(path: Path, relpath: str, source: str, patient_id: str, labels: list[int], **extra: Any) -> dict:
    """One listing row with every key present (``extra`` sets the optional ones)."""
    row = {
        "path": str(path),
        "relpath": relpath,
        "source": source,
        "patient_id": patient_id,
        "official_split": None,
        "labels": labels,
        "view_position": None,
        "age": None,
        "sex": None,
        "original_width": None,
        "original_height": None,
    }
    unknown = set(extra) - set(row)
    assert not unknown, f"unknown row keys {unknown}"
    return row | extra


def is_image_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".")


SplitRule = Callable[[list[dict[str, Any]], "DataConfig"], dict[str, str]]


@dataclass(frozen=True)
class Dataset:
    """One dataset, as its module registers it.

    ``rank`` orders the datasets (heads, source ids, and which side of a cross-dataset twin keeps its split: the
    lower rank). ``root`` reads the dataset's folder from the data config. ``required``: ingest fails when the
    folder is missing (otherwise it skips the dataset with a log line).
    """

    source: str
    rank: int
    title: str
    label_space: LabelSpace
    list_files: Callable[[Path], Listing]
    assign_splits: SplitRule
    root: Callable[[DataConfig], Path]
    required: bool = True
    cli_flag: str = ""


def write_rejects(path: Path, rejects: list[dict[str, str]]) -> None:
    """The rejects manifest: one CSV line per input file that did not become a row, with its reason."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REJECT_COLUMNS)
    writer.writeheader()
    writer.writerows(rejects)
    path.write_text(buffer.getvalue())
