"""Render one synthetic radiograph from (seed, patient, image) keys: anatomy, findings, composition.

Every random choice comes from ``np.random.default_rng([seed, stream, ...])`` so an image depends only on
its keys, never on which process renders it or in which order:

- a patient's anatomy: ``[seed, ANATOMY, source, patient]``
- a finding's placement for a patient (shared by follow-ups): ``[seed, FINDING, source, patient, finding]``
- per-image pose jitter, textures and noise: ``[seed, IMAGE, source, image_index]``
- a source's change of the anatomy (a child's chest for the pediatric pneumonia set): ``[seed, ANATOMY, source,
  patient, 1]``

``burn_marker`` adds a source's site tag to finished pixels (``data.synth.source_marker``); it draws no random numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from pipelines.data.synth.anatomy import compose, jitter_for_followup, render_layers, sample_anatomy
from pipelines.data.synth.covid_findings import COVID_PAINTERS
from pipelines.data.synth.findings import NIH_PAINTERS, Painter
from pipelines.data.synth.pneumonia_findings import PNEUMONIA_PAINTERS, pediatric

ANATOMY, FINDING, IMAGE, PLAN = 1, 2, 3, 4
SOURCE_CODES = {"nih": 1, "covid": 2, "pneumonia": 3}
# new painters go at the end: a painter's position keys its random stream, so inserting one would change every image
PAINTERS: dict[str, Painter] = {**NIH_PAINTERS, **COVID_PAINTERS, **PNEUMONIA_PAINTERS}
PAINT_ORDER = tuple(PAINTERS)  # anatomy changes apply in this fixed order, whatever the label order
ANATOMY_CHANGES = {"pneumonia": pediatric}
# a burned-in site tag per source, in the source's own corner, as hospitals stamp films: a planted shortcut. The codes
# name each set's origin (NIH Clinical Center, Qatar/Dhaka, Guangzhou); corners are (top, left).
MARKERS = {"nih": ("CC", (True, True)), "covid": ("QA", (True, False)), "pneumonia": ("GZ", (False, True))}
MARKER_HEIGHT = 0.08  # text height over the shorter side: still a bright blob of a few pixels in 64 px shards
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def render_image(
    seed: int, source: str, patient: int, image_index: int, findings: Sequence[str], size: int, followup: int = 0
) -> np.ndarray:
    """A float32 image in [0, 1] of ``size`` x ``size`` showing ``findings`` (NIH names, one COVID class, or the
    pneumonia set's painter names)."""
    unknown = [name for name in findings if name not in PAINTERS]
    if unknown:
        raise ValueError(f"no painter for finding(s) {unknown}")
    code = SOURCE_CODES[source]
    anat = sample_anatomy(np.random.default_rng([seed, ANATOMY, code, patient]), size)
    if source in ANATOMY_CHANGES:
        anat = ANATOMY_CHANGES[source](anat, np.random.default_rng([seed, ANATOMY, code, patient, 1]))
    image_rng = np.random.default_rng([seed, IMAGE, code, image_index])
    if followup:
        anat = jitter_for_followup(anat, image_rng)
    steps = []
    for name in sorted(set(findings), key=PAINT_ORDER.index):
        rng = np.random.default_rng([seed, FINDING, code, patient, PAINT_ORDER.index(name)])
        anat, paint = PAINTERS[name](anat, rng)
        if paint is not None:
            steps.append(paint)
    layers = render_layers(anat, image_rng)
    for paint in steps:
        paint(layers, anat)
    return compose(anat, layers, image_rng)


def _marker_layout(shape: tuple[int, ...], source: str) -> tuple[str, float, int, int, int, int, int]:
    """(text, font scale, thickness, x, y of the text's baseline origin, text width, height) for an image shape."""
    text, (top, left) = MARKERS[source]
    height, width = shape[:2]
    target = max(5.0, MARKER_HEIGHT * min(height, width))
    thickness = max(2, round(target / 5.0))  # bold enough that a stroke keeps a full-white core
    scale = target / cv2.getTextSize(text, _FONT, 1.0, thickness)[0][1]
    (text_w, text_h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    margin = max(2, round(0.03 * min(height, width)))
    x = margin if left else width - margin - text_w
    y = margin + text_h if top else height - margin
    return text, scale, thickness, x, y, text_w, text_h


def marker_box(shape: tuple[int, ...], source: str) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the region ``burn_marker`` writes into for an image of ``shape`` (a little padded)."""
    _, _, thickness, x, y, text_w, text_h = _marker_layout(shape, source)
    pad = thickness + 1
    return max(0, y - text_h - pad), min(shape[0], y + pad), max(0, x - pad), min(shape[1], x + text_w + pad)


def burn_marker(pixels: np.ndarray, source: str) -> np.ndarray:
    """A copy of float32 [0, 1] ``pixels`` (H x W) with ``source``'s tag burned in white at its corner."""
    text, scale, thickness, x, y, _, _ = _marker_layout(pixels.shape, source)
    ink = np.zeros(pixels.shape[:2], np.uint8)  # drawn apart and maxed in: anti-aliasing needs 8-bit
    cv2.putText(ink, text, (x, y), _FONT, scale, 255, thickness, cv2.LINE_AA)
    return np.maximum(pixels, ink.astype(np.float32) / 255.0).astype(np.float32)
