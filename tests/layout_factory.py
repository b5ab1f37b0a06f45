"""Tiny hand-written dataset folders in the real NIH and COVID layouts, for tests that must not depend on
the synthetic generator: known labels, known patients, planted corrupt files and one cross-dataset twin."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from models.labels import COVID_DATASET_FOLDER, NIH14, format_nih_labels

NIH_HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
]  # fmt: skip


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _radiograph(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.7 - 0.5 * np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    base -= 0.5 * np.exp(-(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    noise = rng.normal(0, 0.08, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
    return (np.clip(base + noise, 0, 1) * 255).astype(np.uint8)


def write_layouts(root: Path, patients: int = 12, covid_per_class: int = 5, size: int = 64) -> dict:
    """Write ``root/nih`` and ``root/covid``; returns what was planted."""
    rng = np.random.default_rng(0)
    nih, archive = root / "nih", root / "nih" / "images_001" / "images"
    archive.mkdir(parents=True)
    rows, test_names, train_names = [], [], []
    for patient in range(1, patients + 1):
        for follow_up in range(2):
            name = f"{patient:08d}_{follow_up:03d}.png"
            labels = [int(rng.random() < 0.2) for _ in NIH14]
            pixels = _radiograph(rng, size)
            if patient == 1 and follow_up == 0:
                pixels = pixels.astype(np.uint16) * 257  # 16-bit
            if patient == 2 and follow_up == 0:
                pixels = np.dstack([pixels] * 3 + [np.full_like(pixels, 255)])  # RGBA
            (archive / name).write_bytes(_png(pixels))
            rows.append([name, format_nih_labels(labels), follow_up, patient, 40, "F", "PA", 2500, 2048, 0.143, 0.143])
            (test_names if patient % 4 == 0 else train_names).append(name)
    planted = {"empty": "00000003_000.png", "truncated": "00000005_001.png", "not_an_image": "00000006_000.png"}
    (archive / planted["empty"]).write_bytes(b"")
    (archive / planted["truncated"]).write_bytes((archive / planted["truncated"]).read_bytes()[:300])
    (archive / planted["not_an_image"]).write_text("not a radiograph")
    rows[-1][1] = "Bogus_Finding"  # label outside the label space
    (archive / "99999999_000.png").write_bytes(_png(_radiograph(rng, size)))  # not in the CSV
    rows.append(["77777777_000.png", "No Finding", 0, 77777777, 50, "M", "AP", 2500, 2048, 0.14, 0.14])  # no image
    train_names.append("77777777_000.png")
    with open(nih / "Data_Entry_2017_v2020.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(NIH_HEADER)
        writer.writerows(rows)
    (nih / "train_val_list.txt").write_text("\n".join(train_names))
    (nih / "test_list.txt").write_text("\n".join(test_names))

    covid = root / "covid" / COVID_DATASET_FOLDER
    for cls in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"):
        folder = covid / cls / "images"
        folder.mkdir(parents=True)
        for n in range(1, covid_per_class + 1):
            (folder / f"{cls}-{n}.png").write_bytes(_png(_radiograph(rng, size)))
    # A twin: an NIH image re-encoded into the COVID set at another size and a slightly different brightness.
    twin_source = archive / "00000004_000.png"
    twin = np.asarray(Image.open(twin_source).resize((80, 80))).astype(int) + 3
    (covid / "Normal" / "images" / f"Normal-{covid_per_class + 1}.png").write_bytes(
        _png(np.clip(twin, 0, 255).astype(np.uint8))
    )
    return {
        "nih_images": patients * 2 + 1,
        "covid_images": 4 * covid_per_class + 1,
        "corrupt": planted,
        "bad_label": rows[-2][0],
        "not_in_csv": "99999999_000.png",
        "twin": ("images_001/images/00000004_000.png", f"Normal/images/Normal-{covid_per_class + 1}.png"),
    }
