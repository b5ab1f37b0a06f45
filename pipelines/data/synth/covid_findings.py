"""Painters for the COVID-19 Radiography Database classes (same contract as ``findings``).

- COVID: bilateral, peripheral, lower-zone ground glass (hazy, does not hide the vessels completely).
- Viral Pneumonia: diffuse bilateral interstitial (reticular) pattern with a central, perihilar bias.
- Lung_Opacity: one to three focal, fairly dense opacities anywhere in the lungs.
- Normal: nothing.
"""

from __future__ import annotations

import numpy as np

from pipelines.data.synth import raster
from pipelines.data.synth.anatomy import Anatomy, Layers
from pipelines.data.synth.findings import Painter, PaintFn, _net, _texture_sigma, lung_point


def covid(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    level = float(rng.uniform(0.75, 0.9))
    upper = float(rng.uniform(0.30, 0.45))
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))

    def paint(layers: Layers, anat: Anatomy) -> None:
        mottle = 0.7 + 0.3 * raster.smooth_noise(tex_rng, layers.x.shape[0], _texture_sigma(layers, 0.03))
        for side in (0, 1):
            peripheral = raster.smooth_inside(0.33 - layers.pleura[side], 0.08)
            lower = raster.smooth_inside(layers.lung_v[side] - upper, 0.1)
            layers.add_opacity(level * peripheral * lower * np.clip(mottle, 0, 1) * layers.lungs[side])

    return anat, paint


def viral_pneumonia(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    level = float(rng.uniform(0.55, 0.75))
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))

    def paint(layers: Layers, anat: Anatomy) -> None:
        net = _net(layers, tex_rng, 0.03, 0.45)
        for side in (0, 1):
            central = 1.0 - 0.6 * layers.lung_h[side]
            layers.add_opacity(level * (0.35 + 0.65 * net) * central * layers.lungs[side])

    return anat, paint


def lung_opacity(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    spots = [
        (
            int(rng.integers(0, 2)),
            float(rng.uniform(0.25, 0.8)),
            float(rng.uniform(0.2, 0.8)),
            float(rng.uniform(0.12, 0.18)),
            float(rng.uniform(0.88, 1.0)),
        )
        for _ in range(count)
    ]
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))

    def paint(layers: Layers, anat: Anatomy) -> None:
        mottle = raster.spots(tex_rng, layers.x.shape[0], _texture_sigma(layers, 0.025), -0.8)
        for side, v, h, r, level in spots:
            cx, cy = lung_point(layers, side, v, h)
            blob = raster.gaussian_blob(layers.x, layers.y, cx, cy, r * 0.75, r * 0.65)
            layers.add_opacity(level * raster.smooth_inside(blob - 0.3, 0.15) * mottle * layers.lungs[side])

    return anat, paint


def normal(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    return anat, None


COVID_PAINTERS: dict[str, Painter] = {
    "COVID": covid,
    "Lung_Opacity": lung_opacity,
    "Normal": normal,
    "Viral Pneumonia": viral_pneumonia,
}
