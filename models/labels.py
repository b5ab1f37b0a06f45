"""Label spaces: what one dataset's head predicts, and the rules every stage applies to it.

A label space is data, not code: the datasets in ``pipelines/data/datasets/`` declare theirs, ingest writes them to
the manifest, and every checkpoint stores the list its heads were built from, so evaluation, export and serving
rebuild them from the checkpoint and never name a dataset.

- multi-label (NIH's findings): sigmoid per class; "none of them" is all zeros; the confidence of a prediction is
  that of its least certain class, ``min_k max(p_k, 1 - p_k)``; the derived binary answer (any class present) is
  the most likely class's probability.
- multi-class (COVID, pneumonia): softmax; confidence is the top probability; the derived binary answer is the
  probability of any class outside ``negatives``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from models.errors import CxrError


class LabelError(CxrError, ValueError):
    """A label that is not part of the label space."""


@dataclass(frozen=True)
class LabelSpace:
    """One head: its name, the source dataset whose rows train it, its classes and how they combine."""

    head: str
    source: str
    classes: tuple[str, ...]
    multi_label: bool
    binary: str | None = None  # name of the derived yes/no answer ("abnormal", "pneumonia"), None for none
    negatives: tuple[str, ...] = ()  # multi-class: the classes that count as "no" for the binary answer

    def __post_init__(self) -> None:
        unknown = [name for name in self.negatives if name not in self.classes]
        if unknown:
            raise LabelError(f"head {self.head!r}: negatives {unknown} are not among its classes {self.classes}")

    def with_classes(self, classes: Sequence[str]) -> LabelSpace:
        """The same space over the classes a download actually has (the 3-class COVID releases)."""
        return replace(self, classes=tuple(classes), negatives=tuple(n for n in self.negatives if n in classes))

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise LabelError(f"class {name!r} is not one of {', '.join(self.classes)} (head {self.head})")
        return self.classes.index(name)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        probs = np.asarray(probs)
        return np.maximum(probs, 1.0 - probs).min(axis=-1) if self.multi_label else probs.max(axis=-1)

    def binary_probability(self, probs: np.ndarray) -> np.ndarray:
        """The derived binary answer from the head's probabilities (last axis).

        Multi-label: the most likely class, a lower bound of P(any) that assumes nothing about how classes co-occur
        (``1 - prod(1 - p)`` would assume independence, and NIH's findings are strongly correlated).
        """
        probs = np.asarray(probs)
        if self.multi_label:
            return probs.max(axis=-1)
        keep = [k for k, name in enumerate(self.classes) if name not in self.negatives]
        return probs[..., keep].sum(axis=-1)

    def binary_target(self, labels: np.ndarray) -> np.ndarray:
        """True where a row's label says "yes" to the binary answer (``labels`` as the batches carry them)."""
        labels = np.asarray(labels)
        if self.multi_label:
            return labels.any(axis=-1)
        negatives = [self.classes.index(name) for name in self.negatives]
        return ~np.isin(labels, negatives)

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "source": self.source,
            "classes": list(self.classes),
            "multi_label": self.multi_label,
            "binary": self.binary,
            "negatives": list(self.negatives),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelSpace:
        return cls(
            head=data["head"],
            source=data["source"],
            classes=tuple(data["classes"]),
            multi_label=bool(data["multi_label"]),
            binary=data.get("binary"),
            negatives=tuple(data.get("negatives") or ()),
        )


def label_key(head: str) -> str:
    """The batch and prediction key of a head's labels: float ``[B, K]`` 0/1 (multi-label), or int ``[B]`` class
    indices (multi-class), filled (zeros, -1) on rows of other sources; losses and metrics mask by ``source``."""
    return f"label_{head}"


def by_head(spaces: Iterable[LabelSpace]) -> dict[str, LabelSpace]:
    return {space.head: space for space in spaces}


def spaces_from_dicts(items: Iterable[Mapping[str, Any]]) -> tuple[LabelSpace, ...]:
    return tuple(LabelSpace.from_dict(item) for item in items)
