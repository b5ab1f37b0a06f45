"""The two label spaces: NIH ChestX-ray14 findings (multi-label) and COVID-19 Radiography classes (multi-class)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from models.errors import CxrError

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

# Folder names of the COVID-19 Radiography Database (version 4). Older 3-class releases lack Lung_Opacity.
COVID_CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
COVID_DATASET_FOLDER = "COVID-19_Radiography_Dataset"

SOURCES: tuple[str, ...] = ("nih", "covid")


class LabelError(CxrError, ValueError):
    """A label that is not part of the label space."""


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


def abnormal_probability(nih_probs: np.ndarray) -> np.ndarray:
    """NIH's binary screening answer, any finding vs "No Finding", from the 14 finding probabilities (last axis).

    The most likely finding's probability: a lower bound of P(any finding) that assumes nothing about how findings
    co-occur (``1 - prod(1 - p)`` would assume independence, and NIH's findings are strongly correlated).
    """
    return np.asarray(nih_probs).max(axis=-1)


def covid_class_index(name: str, classes: tuple[str, ...] = COVID_CLASSES) -> int:
    if name not in classes:
        raise LabelError(f"class {name!r} is not one of {', '.join(classes)}")
    return classes.index(name)
