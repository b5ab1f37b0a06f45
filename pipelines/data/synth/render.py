"""Render one synthetic radiograph from (seed, patient, image) keys: anatomy, findings, composition.

Every random choice comes from ``np.random.default_rng([seed, stream, ...])`` so an image depends only on
its keys, never on which process renders it or in which order:

- a patient's anatomy: ``[seed, ANATOMY, source, patient]``
- a finding's placement for a patient (shared by follow-ups): ``[seed, FINDING, source, patient, finding]``
- per-image pose jitter, textures and noise: ``[seed, IMAGE, source, image_index]``
- a source's change of the anatomy (a child's chest for the pediatric pneumonia set): ``[seed, ANATOMY, source,
  patient, 1]``
"""

from __future__ import annotations

from collections.abc import Sequence

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
