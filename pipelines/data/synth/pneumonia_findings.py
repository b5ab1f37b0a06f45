"""Painters for Kermany's pediatric pneumonia classes (same contract as ``findings``), and a child's chest.

- bacterial: lobar or segmental consolidation: dense, focal, one zone of one lung, sharply bounded where a
  fissure limits it, often with air bronchograms (dark branching tubes through the opacity).
- viral: diffuse bilateral interstitial pattern, strongest around the hila (peribronchial streaks and a fine
  reticular net), often with hyperinflation (flat, low diaphragm).
- normal: no finding (an empty finding tuple; there is no painter for it).

``pediatric`` turns an adult anatomy into a child's: a smaller chest in the frame, shorter and rounder lungs,
a relatively larger heart and mediastinum (thymus), no breast shadows.
"""

from __future__ import annotations

import numpy as np

from pipelines.data.synth import raster
from pipelines.data.synth.anatomy import Anatomy, Layers
from pipelines.data.synth.findings import Painter, PaintFn, _net, _radial_streaks, _texture_sigma, lung_point

BACTERIAL, VIRAL = "pneumonia/bacterial", "pneumonia/viral"
CLASS_FINDINGS: dict[str, tuple[str, ...]] = {"normal": (), "bacterial": (BACTERIAL,), "viral": (VIRAL,)}

# lung_v ranges of the zones a lobar consolidation fills (apex 0, costophrenic angle 1)
_ZONES = {
    "upper": ((0.0, 0.0), (0.38, 0.5)),
    "middle": ((0.36, 0.46), (0.62, 0.74)),
    "lower": ((0.5, 0.62), (1.0, 1.0)),
}


def pediatric(anat: Anatomy, rng: np.random.Generator) -> Anatomy:
    """A child's chest from an adult anatomy (drawn from the patient's own anatomy stream)."""
    cx, cy, ax, ay, ang = anat.heart
    grow = float(rng.uniform(1.08, 1.2))
    lower_apex = float(rng.uniform(0.04, 0.09))
    widen = float(rng.uniform(1.0, 1.05))
    return anat.with_changes(
        scale=anat.scale * float(rng.uniform(0.74, 0.88)),
        shift=(anat.shift[0], anat.shift[1] + float(rng.uniform(-0.02, 0.06))),
        lung_top=[t + lower_apex for t in anat.lung_top],
        lung_width=[w * widen for w in anat.lung_width],
        body_width=anat.body_width * widen,
        heart=(cx, cy, ax * grow, ay * grow * 1.05, ang),
        mediastinum=anat.mediastinum * float(rng.uniform(1.1, 1.3)),
        rib_spacing=anat.rib_spacing * float(rng.uniform(1.05, 1.15)),
        female=False,
        stomach_bubble=bool(rng.random() < 0.9),
    )


def bacterial(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    side = int(rng.integers(0, 2))
    lobar = bool(rng.random() < 0.6)
    zone = str(rng.choice(list(_ZONES), p=[0.3, 0.25, 0.45]))
    (lo_min, lo_max), (hi_min, hi_max) = _ZONES[zone]
    top, bottom = float(rng.uniform(lo_min, lo_max)), float(rng.uniform(hi_min, hi_max))
    centre = (float(rng.uniform(top + 0.1, max(top + 0.1, bottom - 0.1))), float(rng.uniform(0.35, 0.75)))
    radius = float(rng.uniform(0.13, 0.2))
    level = float(rng.uniform(0.85, 1.0))
    bronchograms = bool(rng.random() < 0.5)
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))

    def paint(layers: Layers, anat: Anatomy) -> None:
        v, h = layers.lung_v[side], layers.lung_h[side]
        if lobar:  # a fissure bounds it sharply; the chest wall and diaphragm bound the rest
            region = raster.smooth_inside(v - top, 0.012) * raster.smooth_inside(bottom - v, 0.012)
            region = region * raster.smooth_inside(h - 0.08, 0.05)
        else:  # segmental: a confluent patch, denser at its centre
            cx, cy = lung_point(layers, side, *centre)
            blob = raster.gaussian_blob(layers.x, layers.y, cx, cy, radius, radius * 0.8)
            region = raster.smooth_inside(blob - 0.3, 0.12)
        mottle = np.clip(
            0.85 + 0.2 * raster.smooth_noise(tex_rng, layers.x.shape[0], _texture_sigma(layers, 0.02)), 0, 1
        )
        patch = level * region * mottle
        if bronchograms:
            tubes = raster.blur(_radial_streaks(layers, tex_rng, side, 0.25), layers.x.shape[0] / 256.0)
            patch = patch * (1.0 - 0.5 * tubes * region)
        layers.add_opacity(patch * layers.lungs[side])
        layers.extra += 0.05 * region * layers.lungs[side]

    return anat, paint


def viral(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    level = float(rng.uniform(0.5, 0.7))
    spread = float(rng.uniform(0.4, 0.6))  # how far out from the hila the pattern reaches (lung_h units)
    if rng.random() < 0.5:  # air trapping: low, flat diaphragm
        drop = float(rng.uniform(0.03, 0.07))
        anat = anat.with_changes(
            lung_base=[b + drop for b in anat.lung_base],
            dome_height=[d * float(rng.uniform(0.55, 0.75)) for d in anat.dome_height],
            lung_air=anat.lung_air * float(rng.uniform(1.04, 1.1)),
        )
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))

    def paint(layers: Layers, anat: Anatomy) -> None:
        net = _net(layers, tex_rng, 0.03, 0.4)
        for side in (0, 1):
            streaks = raster.blur(_radial_streaks(layers, tex_rng, side, 0.6), layers.x.shape[0] / 200.0)
            perihilar = np.exp(-((layers.lung_h[side] / spread) ** 2)) * np.exp(
                -(((layers.lung_v[side] - 0.55) / 0.4) ** 2)
            )
            pattern = np.clip(0.3 + 0.4 * net + 0.5 * streaks, 0.0, 1.0)
            layers.add_opacity(level * pattern * (0.3 + 0.7 * perihilar) * layers.lungs[side])

    return anat, paint


PNEUMONIA_PAINTERS: dict[str, Painter] = {BACTERIAL: bacterial, VIRAL: viral}
