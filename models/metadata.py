"""Patient metadata for the optional fusion head: age, sex and view position as a fixed-width vector.

NIH rows carry all three (``Patient Age``, ``Patient Gender``, ``View Position``); DICOM uploads carry them in the
header; COVID and pneumonia rows have none. A missing value is not a value: each field has its own "missing"
indicator, so the model can learn what an absent age means instead of reading it as age 0. Fields:

- ``age``: years / 100, clipped to [0, 1.2] (0 when missing), and ``age_missing``
- ``sex_male``, ``sex_female``, ``sex_missing`` (one-hot)
- ``view_pa``, ``view_ap``, ``view_missing`` (one-hot; other views, such as LL, count as missing)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

FEATURES: tuple[str, ...] = (
    "age",
    "age_missing",
    "sex_male",
    "sex_female",
    "sex_missing",
    "view_pa",
    "view_ap",
    "view_missing",
)
EMBEDDING_SIZE = 16
_SEXES = {"M": "sex_male", "MALE": "sex_male", "F": "sex_female", "FEMALE": "sex_female"}
_VIEWS = {"PA": "view_pa", "AP": "view_ap"}


def _age(value: Any) -> float | None:
    if value is None:
        return None
    try:
        age = float(str(value).strip().upper().rstrip("Y"))  # DICOM writes "058Y"
    except ValueError:
        return None
    return age if math.isfinite(age) and 0 <= age <= 130 else None


def encode(age: Any = None, sex: Any = None, view_position: Any = None) -> np.ndarray:
    """One row of ``FEATURES`` (float32); unknown or unparseable values count as missing."""
    vector = dict.fromkeys(FEATURES, 0.0)
    years = _age(age)
    if years is None:
        vector["age_missing"] = 1.0
    else:
        vector["age"] = min(years / 100.0, 1.2)
    vector[_SEXES.get(str(sex).strip().upper(), "sex_missing") if sex is not None else "sex_missing"] = 1.0
    view = str(view_position).strip().upper() if view_position is not None else ""
    vector[_VIEWS.get(view, "view_missing")] = 1.0
    return np.array([vector[name] for name in FEATURES], dtype=np.float32)


def encode_rows(ages: Sequence[Any], sexes: Sequence[Any], views: Sequence[Any]) -> np.ndarray:
    """``[N, len(FEATURES)]`` float32 for N rows of (age, sex, view position)."""
    rows = [encode(a, s, v) for a, s, v in zip(ages, sexes, views, strict=True)]
    return np.stack(rows) if rows else np.zeros((0, len(FEATURES)), np.float32)


def missing(batch: int, device: torch.device | None = None) -> torch.Tensor:
    """The vector of a row with no metadata at all, repeated ``batch`` times."""
    return torch.from_numpy(encode()).to(device).expand(batch, -1)


class MetadataEncoder(nn.Module):
    """``[B, len(FEATURES)] -> [B, EMBEDDING_SIZE]``: a small embedding concatenated to the image features."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(len(FEATURES), EMBEDDING_SIZE), nn.ReLU())

    def forward(self, metadata: torch.Tensor) -> torch.Tensor:
        return self.layers(metadata.float())
