"""``POST /v1/explain``: which label and which model a request asks about, and how the answer is written.

The Grad-CAM itself runs on the model replicas (``ModelReplica.explain``, one function in ``models.explain``);
the router only fuses the two maps for ``model=ensemble`` and draws the overlay, both a few milliseconds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from starlette.datastructures import QueryParams

from models.ensemble import HEADS
from models.explain import overlay
from serve.inputs import InputRejected

EXPLAIN_MODELS = ("cnn", "vit", "ensemble")
FORMATS = ("json", "png")
OVERLAY_MIN_SIZE = 256  # small model inputs (64 px) are drawn larger so the overlay is readable


@dataclass(frozen=True)
class ExplainQuery:
    head: str
    target: str | None  # None: the most probable label of ``head`` under ``model``
    model: str
    format: str

    @classmethod
    def from_params(cls, params: QueryParams) -> ExplainQuery:
        head, model, fmt = params.get("head", "nih14"), params.get("model", "cnn"), params.get("format", "json")
        if head not in HEADS:
            raise InputRejected(400, "bad_head", f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if model not in EXPLAIN_MODELS:
            raise InputRejected(400, "bad_model", f"model must be one of {', '.join(EXPLAIN_MODELS)}, got {model!r}")
        if fmt not in FORMATS:
            raise InputRejected(400, "bad_format", f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return cls(head, params.get("target") or None, model, fmt)

    @property
    def roles(self) -> tuple[str, ...]:
        return ("cnn", "vit") if self.model == "ensemble" else (self.model,)


def target_index(labels: dict[str, list[str]], head: str, target: str) -> int:
    names = list(labels[head])
    if target not in names:
        raise InputRejected(400, "bad_target", f"target {target!r} is not a {head} label; known: {', '.join(names)}")
    return names.index(target)


def overlay_png(image: np.ndarray, cam: np.ndarray) -> bytes:
    """PNG of the model's input image (grayscale uint8 [S, S]) with the map blended on top."""
    size = max(image.shape[0], OVERLAY_MIN_SIZE)
    base = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    buffer = io.BytesIO()
    Image.fromarray(overlay(base, cam)).save(buffer, format="PNG")
    return buffer.getvalue()


def map_json(cam: np.ndarray) -> dict[str, Any]:
    return {"height": int(cam.shape[0]), "width": int(cam.shape[1]), "values": np.round(cam, 4).tolist()}
