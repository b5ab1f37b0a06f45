"""File formats of the three real datasets, as the synthetic writer produces them.

- NIH ChestX-ray14: ``images_NNN/images/PPPPPPPP_FFF.png`` (a new archive folder every N images),
  ``Data_Entry_2017_v2020.csv`` with the real header and value formats, and the official split lists
  ``train_val_list.txt`` / ``test_list.txt`` (one name a line, no trailing newline, like the real files).
- COVID-19 Radiography Database v4: ``COVID-19_Radiography_Dataset/<class>/images/<class>-<n>.png``.
- Kermany pneumonia: ``chest_xray/<train|val|test>/<NORMAL|PNEUMONIA>/<name>.jpeg`` with the real names
  (``person<P>_bacteria_<N>``, ``person<P>_virus_<N>``, ``IM-<NNNN>-<MMMM>``, ``NORMAL2-IM-<NNNN>-<MMMM>[-<K>]``).

Also the byte-level plants for tests: zero-byte, truncated and text-as-PNG files, and re-encoded copies of
NIH images for the cross-dataset duplicate check.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.data.datasets.covid import DATASET_FOLDER as COVID_DATASET_FOLDER
from pipelines.data.datasets.pneumonia import DATASET_FOLDER as PNEUMONIA_DATASET_FOLDER

NIH_CSV_NAME = "Data_Entry_2017_v2020.csv"
# The real header: the csv module reads "OriginalImage[Width,Height]" as two columns, and so on.
NIH_CSV_COLUMNS: tuple[str, ...] = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
NIH_CSV_HEADER = ",".join(NIH_CSV_COLUMNS)
NIH_TRAIN_VAL_LIST = "train_val_list.txt"
NIH_TEST_LIST = "test_list.txt"
MANIFEST_NAME = "synth_manifest.json"

# (width, height, spacing x, spacing y) as written in the real CSV, with their share of the real images.
NIH_ORIGINAL_GEOMETRY: tuple[tuple[tuple[str, str, str, str], float], ...] = (
    (("2500", "2048", "0.168", "0.168"), 0.28),
    (("2992", "2991", "0.14300000000000002", "0.14300000000000002"), 0.21),
    (("3056", "2544", "0.139", "0.139"), 0.14),
    (("2500", "2048", "0.171", "0.171"), 0.07),
    (("2048", "2500", "0.168", "0.168"), 0.06),
    (("2021", "2021", "0.19431099999999998", "0.19431099999999998"), 0.04),
    (("2048", "2500", "0.171", "0.171"), 0.03),
    (("2544", "3056", "0.139", "0.139"), 0.02),
    (("2990", "2991", "0.14300000000000002", "0.14300000000000002"), 0.01),
)

DECODE_PLANTS = ("empty", "truncated", "not_an_image")
NOT_AN_IMAGE_TEXT = b"This is not a PNG image: a corrupt file planted by cxr synth for ingest tests.\n"


def nih_image_name(patient: int, followup: int) -> str:
    return f"{patient:08d}_{followup:03d}.png"


def nih_archive_folder(archive: int) -> str:
    """``images_001/images`` for archive 1 (archives are numbered from 1)."""
    return f"images_{archive:03d}/images"


def covid_relpath(cls: str, number: int) -> str:
    """Path of the ``number``-th image (from 1) of ``cls``, relative to the COVID root."""
    return f"{COVID_DATASET_FOLDER}/{cls}/images/{cls}-{number}.png"


def pneumonia_relpath(split: str, cls: str, name: str) -> str:
    """Path of a pneumonia-set image relative to its root (the folder holding ``chest_xray``)."""
    return f"{PNEUMONIA_DATASET_FOLDER}/{split}/{'NORMAL' if cls == 'normal' else 'PNEUMONIA'}/{name}"


def pneumonia_image_name(cls: str, person: int, number: int) -> str:
    """``person<P>_bacteria_<N>.jpeg`` / ``person<P>_virus_<N>.jpeg``: N counts the set's pneumonia images."""
    return f"person{person}_{'bacteria' if cls == 'bacterial' else 'virus'}_{number}.jpeg"


def normal_image_name(series: str, study: int, image: int, version: int = 0) -> str:
    """``IM-0115-0001.jpeg``, ``NORMAL2-IM-0246-0001.jpeg``, or with a version ``NORMAL2-IM-0246-0001-0002.jpeg``."""
    prefix = "NORMAL2-IM" if series == "NORMAL2" else "IM"
    return f"{prefix}-{study:04d}-{image:04d}" + (f"-{version:04d}" if version else "") + ".jpeg"


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def encode_png(image: np.ndarray, mode: str) -> bytes:
    """Encode a [0, 1] float image as PNG in ``mode``: ``L``, ``RGB``, ``RGBA`` (alpha 255) or ``I;16``."""
    if mode == "I;16":
        pil = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16))
    else:
        gray = to_uint8(image)
        if mode == "L":
            pil = Image.fromarray(gray)
        elif mode in ("RGB", "RGBA"):
            channels = [gray, gray, gray] + ([np.full_like(gray, 255)] if mode == "RGBA" else [])
            pil = Image.fromarray(np.stack(channels, axis=-1))
        else:
            raise ValueError(f"unsupported PNG mode {mode!r}")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(image: np.ndarray, mode: str, quality: int) -> bytes:
    """Encode a [0, 1] float image as a baseline JPEG in ``L`` or ``RGB`` (three equal channels)."""
    gray = to_uint8(image)
    if mode == "L":
        pil = Image.fromarray(gray)
    elif mode == "RGB":
        pil = Image.fromarray(np.stack([gray, gray, gray], axis=-1))
    else:
        raise ValueError(f"unsupported JPEG mode {mode!r}")
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def corrupt_bytes(kind: str, valid_png: bytes) -> bytes:
    """The bytes of a planted broken file: ``empty``, ``truncated`` (a valid PNG cut in half), ``not_an_image``."""
    if kind == "empty":
        return b""
    if kind == "truncated":
        return valid_png[: len(valid_png) // 2]
    if kind == "not_an_image":
        return NOT_AN_IMAGE_TEXT
    raise ValueError(f"unknown corrupt kind {kind!r}")


def near_duplicate_png(source: Path, size: int, brightness: float, mode: str = "L") -> bytes:
    """A re-encoded copy of an image file: resized to ``size``, brightness scaled, saved in ``mode``."""
    with Image.open(source) as image:
        gray = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    return encode_png(np.clip(pixels * brightness, 0.0, 1.0), mode)


def write_nih_csv(path: Path, rows: Iterable[Sequence[object]]) -> None:
    """``Data_Entry_2017_v2020.csv``: the real header, ``\\n`` line ends, values in the real formats."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(NIH_CSV_COLUMNS)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")


def write_name_list(path: Path, names: Iterable[str]) -> None:
    """One image name a line, sorted, without a trailing newline (as in the real official lists)."""
    path.write_text("\n".join(sorted(names)), encoding="utf-8", newline="")
