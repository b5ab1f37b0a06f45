"""``POST /v1/explain``: which label, which model and which method a request asks about, and how the answer is
written.

The map itself runs on the model replicas (``ModelReplica.explain``, ``models.explain.explain``); the router only
fuses the two maps for ``model=ensemble`` and draws the overlay, both a few milliseconds. ``method=grad-cam`` (the
default) works for every model; ``method=attention`` (the class token's attention, ``models.explain.attention_map``)
only for models that have one (the hybrid CNN + Transformer): each replica lists its methods in ``describe()``
(``explain_methods``), and a role without the method asked for is refused with 400 ``unsupported_method``. ``head``
is any head of the served checkpoint (``resolve_head``; default its first), ``target`` any class of that head.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from starlette.datastructures import QueryParams

from models.explain import GRAD_CAM, METHODS, overlay
from models.labels import LabelSpace
from serve.inputs import InputRejected

EXPLAIN_MODELS = ("cnn", "vit", "ensemble")
FORMATS = ("json", "png")
OVERLAY_MIN_SIZE = 256  # small model inputs (64 px) are drawn larger so the overlay is readable


@dataclass(frozen=True)
class ExplainQuery:
    head: str | None  # None: the model's first head; checked against the model's heads by ``resolve_head``
    target: str | None  # None: the most probable label of ``head`` under ``model``
    model: str
    format: str
    method: str = GRAD_CAM

    @classmethod
    def from_params(cls, params: QueryParams) -> ExplainQuery:
        head, model, fmt = params.get("head") or None, params.get("model", "cnn"), params.get("format", "json")
        method = params.get("method", GRAD_CAM)
        if model not in EXPLAIN_MODELS:
            raise InputRejected(400, "bad_model", f"model must be one of {', '.join(EXPLAIN_MODELS)}, got {model!r}")
        if fmt not in FORMATS:
            raise InputRejected(400, "bad_format", f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if method not in METHODS:
            raise InputRejected(400, "bad_method", f"method must be one of {', '.join(METHODS)}, got {method!r}")
        return cls(head, params.get("target") or None, model, fmt, method)

    @property
    def roles(self) -> tuple[str, ...]:
        return ("cnn", "vit") if self.model == "ensemble" else (self.model,)


def check_method(method: str, infos: dict[str, dict[str, Any]]) -> None:
    """400 ``unsupported_method`` unless every role asked (role -> its ``describe()``) offers ``method``."""
    for role, info in infos.items():
        offered = info.get("explain_methods") or [GRAD_CAM]  # replicas that predate the list: Grad-CAM only
        if method not in offered:
            raise InputRejected(
                400,
                "unsupported_method",
                f"the {role} model ({info.get('arch', 'unknown arch')}) has no {method} explanation; "
                f"it offers {', '.join(offered)}",
            )


def resolve_head(head: str | None, spaces: tuple[LabelSpace, ...]) -> LabelSpace:
    """The label space of ``head`` among the model's (None: its first head); 400 ``bad_head`` names the known ones."""
    if head is None:
        return spaces[0]
    for space in spaces:
        if space.head == head:
            return space
    known = ", ".join(space.head for space in spaces)
    raise InputRejected(400, "bad_head", f"head must be one of the model's heads ({known}), got {head!r}")


def target_index(space: LabelSpace, target: str) -> int:
    if target not in space.classes:
        known = ", ".join(space.classes)
        raise InputRejected(400, "bad_target", f"target {target!r} is not a {space.head} label; known: {known}")
    return space.classes.index(target)


def overlay_png(image: np.ndarray, cam: np.ndarray) -> bytes:
    """PNG of the model's input image (grayscale uint8 [S, S]) with the map blended on top."""
    size = max(image.shape[0], OVERLAY_MIN_SIZE)
    base = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    buffer = io.BytesIO()
    Image.fromarray(overlay(base, cam)).save(buffer, format="PNG")
    return buffer.getvalue()


def map_json(cam: np.ndarray) -> dict[str, Any]:
    return {"height": int(cam.shape[0]), "width": int(cam.shape[1]), "values": np.round(cam, 4).tolist()}
