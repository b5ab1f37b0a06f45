"""Painters for the 14 NIH findings and the COVID-19 Radiography classes.

Each painter takes the anatomy and a generator, draws its random placement, size and severity, and returns
the (possibly changed) anatomy plus an optional ``paint(layers, anatomy)`` step that edits the density
layers after rendering. Anatomical signs (a big heart, a raised or flattened diaphragm) change parameters;
opacities and lucencies are painted. Signs are deliberately coarse so that they survive downsampling to
64 px: a nodule is >= 5% of the image width, a mass >= 11%, textures have cells of several 64-px pixels.

``render_findings`` is the entry point: normal anatomy, then every finding in turn, then ``compose``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipelines.data.synth import raster
from pipelines.data.synth.anatomy import Anatomy, Layers

Array = np.ndarray
PaintFn = Callable[[Layers, Anatomy], None]
Painter = Callable[[Anatomy, np.random.Generator], tuple[Anatomy, PaintFn | None]]


# --------------------------------------------------------------------------------------------- helpers


def lung_point(layers: Layers, side: int, v: float, h: float) -> tuple[float, float]:
    """Body-frame point in the aerated part of lung ``side`` nearest to (``v``, ``h``) lung fractions."""
    aerated = layers.lungs[side] * layers.air
    cost = (layers.lung_v[side] - v) ** 2 + (layers.lung_h[side] - h) ** 2 + 4.0 * (aerated < 0.7)
    iy, ix = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return float(layers.x[iy, ix]), float(layers.y[iy, ix])


def _soft(layers: Layers) -> float:
    return max(0.006, 1.2 / layers.x.shape[0])


def _texture_sigma(layers: Layers, fraction: float) -> float:
    """A noise correlation length in pixels for a feature ``fraction`` of the image wide."""
    return max(0.8, fraction * layers.x.shape[0])


def _sides(rng: np.random.Generator, bilateral_p: float) -> tuple[int, ...]:
    if rng.random() < bilateral_p:
        return (0, 1)
    return (int(rng.integers(0, 2)),)


def _round_opacity(
    layers: Layers, cx: float, cy: float, radius: float, lobulation: float, rng: np.random.Generator
) -> Array:
    """A round (optionally lobulated) dense blob."""
    angle = np.arctan2(layers.y - cy, layers.x - cx)
    wobble = 1.0 + lobulation * raster.periodic_noise_1d(rng, angle, (2, 5), 4)
    r = np.sqrt((layers.x - cx) ** 2 + (layers.y - cy) ** 2) / (radius * wobble)
    return raster.smooth_inside(1.0 - r, 0.08)


def _net(layers: Layers, rng: np.random.Generator, cell: float, line: float) -> Array:
    """A coarse reticular network: the zero lines of two smooth noise fields."""
    size = layers.x.shape[0]
    sigma = _texture_sigma(layers, cell)
    a, b = raster.smooth_noise(rng, size, sigma), raster.smooth_noise(rng, size, sigma)
    return np.maximum(np.exp(-((a / line) ** 2)), np.exp(-((b / line) ** 2))).astype(np.float32)


# ------------------------------------------------------------------------------------- NIH findings


def cardiomegaly(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    cx, cy, ax, ay, ang = anat.heart
    grow = float(rng.uniform(1.4, 1.65))
    heart = (cx + 0.05, cy + 0.01, ax * grow, ay * (1.0 + 0.45 * (grow - 1.0)), ang - 4.0)
    return anat.with_changes(heart=heart), None


def effusion(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    sides = _sides(rng, 0.3)
    heights = {s: float(rng.uniform(0.12, 0.28)) for s in sides}
    meniscus = float(rng.uniform(0.15, 0.25))

    def paint(layers: Layers, anat: Anatomy) -> None:
        for side in sides:
            level = 1.0 - heights[side] - meniscus * layers.lung_h[side] ** 2
            fluid = raster.smooth_inside(layers.lung_v[side] - level, 0.03) * layers.lungs[side]
            layers.add_opacity(fluid)
            layers.extra += 0.08 * fluid

    return anat, paint


def _opacity_blobs(count: int, radius: tuple[float, float], lobulation: float, density: float) -> Painter:
    def painter(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
        spots = [
            (
                int(rng.integers(0, 2)),
                float(rng.uniform(0.2, 0.75)),
                float(rng.uniform(0.25, 0.75)),
                float(rng.uniform(*radius)),
            )
            for _ in range(count)
        ]
        blob_rng = np.random.default_rng(rng.integers(0, 2**32))

        def paint(layers: Layers, anat: Anatomy) -> None:
            for side, v, h, r in spots:
                cx, cy = lung_point(layers, side, v, h)
                blob = _round_opacity(layers, cx, cy, r, lobulation, blob_rng)
                layers.add_opacity(density * blob)
                layers.extra += 0.14 * blob * layers.body

        return anat, paint

    return painter


def nodule(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    count = 1 if rng.random() < 0.7 else 2
    return _opacity_blobs(count, (0.06, 0.08), 0.0, 0.98)(anat, rng)


def mass(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    return _opacity_blobs(1, (0.13, 0.18), 0.12, 0.98)(anat, rng)


def pneumonia(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    """Clustered, confluent fluffy airspace opacities (cotton-wool blobs) in one or both lower/mid zones."""
    sides = _sides(rng, 0.25)
    centres = {s: (float(rng.uniform(0.45, 0.75)), float(rng.uniform(0.4, 0.7))) for s in sides}
    blobs = {s: rng.normal(0.0, 0.11, size=(int(rng.integers(6, 10)), 2)) for s in sides}
    radii = {s: rng.uniform(0.08, 0.11, size=len(blobs[s])) for s in sides}
    level = float(rng.uniform(0.88, 1.0))
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))

    def paint(layers: Layers, anat: Anatomy) -> None:
        mottle = 0.85 + 0.2 * raster.smooth_noise(tex_rng, layers.x.shape[0], _texture_sigma(layers, 0.015))
        for side in sides:
            cx, cy = lung_point(layers, side, *centres[side])
            cluster = np.zeros_like(layers.x)
            for (dx, dy), r in zip(blobs[side], radii[side], strict=True):
                cluster = np.maximum(cluster, raster.gaussian_blob(layers.x, layers.y, cx + dx, cy + dy, r, r))
            patch = raster.smooth_inside(cluster - 0.35, 0.2)
            layers.add_opacity(level * patch * np.clip(mottle, 0.0, 1.0) * layers.lungs[side])

    return anat, paint


def consolidation(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    side = int(rng.integers(0, 2))
    upper = rng.random() < 0.4
    fissure = float(rng.uniform(0.42, 0.52)) if upper else float(rng.uniform(0.45, 0.6))
    tilt = float(rng.uniform(-0.15, 0.15))
    level = float(rng.uniform(0.92, 1.0))

    def paint(layers: Layers, anat: Anatomy) -> None:
        edge = fissure + tilt * (layers.lung_h[side] - 0.5)
        signed = (edge - layers.lung_v[side]) if upper else (layers.lung_v[side] - edge)
        lobe = raster.smooth_inside(signed, 0.01) * layers.lungs[side]
        lobe *= raster.smooth_inside(layers.lung_h[side] - 0.08, 0.05)
        layers.add_opacity(level * lobe)
        layers.extra += 0.05 * lobe

    return anat, paint


def _radial_streaks(layers: Layers, rng: np.random.Generator, side: int, width: float) -> Array:
    """Coarse streaks running outwards from the hilum of lung ``side`` (zero lines of polar noise)."""
    hx, hy = lung_point(layers, side, 0.45, 0.0)
    r = np.sqrt((layers.x - hx) ** 2 + (layers.y - hy) ** 2)
    theta = np.arctan2(layers.y - hy, layers.x - hx)
    n_theta, n_r = 180, 48
    field_ = raster.smooth_noise(rng, (n_theta, n_r), 1.8, 6.0)
    ti = np.clip(((theta + np.pi) / (2 * np.pi) * n_theta).astype(np.int64), 0, n_theta - 1)
    ri = np.clip((r / 1.2 * n_r).astype(np.int64), 0, n_r - 1)
    return np.exp(-((field_[ti, ri] / width) ** 2)).astype(np.float32)


def infiltration(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    sides = _sides(rng, 0.45)
    level = float(rng.uniform(0.5, 0.7))
    zone = float(rng.uniform(0.5, 0.75))
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))

    def paint(layers: Layers, anat: Anatomy) -> None:
        haze = 0.6 + 0.4 * raster.smooth_noise(tex_rng, layers.x.shape[0], _texture_sigma(layers, 0.04))
        for side in sides:
            streaks = raster.blur(_radial_streaks(layers, tex_rng, side, 0.8), layers.x.shape[0] / 160.0)
            envelope = np.exp(-(((layers.lung_v[side] - zone) / 0.3) ** 2)) * (0.5 + 0.5 * layers.lung_h[side])
            pattern = np.clip(0.3 * haze + 0.8 * streaks, 0.0, 1.0)
            layers.add_opacity(level * pattern * envelope * layers.lungs[side])

    return anat, paint


def pneumothorax(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    side = int(rng.integers(0, 2))
    gap = float(rng.uniform(0.14, 0.26))

    def paint(layers: Layers, anat: Anatomy) -> None:
        soft = _soft(layers)
        depth = layers.pleura[side]
        space = raster.smooth_inside(gap - depth, soft) * layers.lungs[side]
        line = raster.band(depth - gap, 0.012, soft) * layers.lungs[side]
        layers.markings *= 1.0 - space
        layers.lucency += 0.16 * space
        collapsed = layers.lungs[side] * (1.0 - space)
        layers.add_opacity(0.15 * collapsed + 0.6 * line)

    return anat, paint


def atelectasis(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    side = int(rng.integers(0, 2))
    raise_by = float(rng.uniform(0.11, 0.17))
    base = list(anat.lung_base)
    width = list(anat.lung_width)
    base[side] -= raise_by
    width[side] *= float(rng.uniform(0.90, 0.95))
    plates = [(float(rng.uniform(0.55, 0.8)), float(rng.uniform(-0.1, 0.1))) for _ in range(int(rng.integers(1, 3)))]

    def paint(layers: Layers, anat: Anatomy) -> None:
        soft = _soft(layers)
        v, h = layers.lung_v[side], layers.lung_h[side]
        for level, tilt in plates:
            plate = raster.band(v - level - tilt * h, 0.035, soft * 2) * raster.smooth_inside(0.85 - h, 0.05)
            layers.add_opacity(0.9 * plate * raster.smooth_inside(h - 0.1, 0.05) * layers.lungs[side])
        wedge = raster.smooth_inside(0.3 - h + 0.4 * (v - 0.6), 0.05) * raster.smooth_inside(v - 0.55, 0.05)
        layers.add_opacity(0.55 * wedge * layers.lungs[side])

    return anat.with_changes(lung_base=base, lung_width=width), paint


def edema(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    level = float(rng.uniform(0.6, 0.8))
    spread = float(rng.uniform(0.24, 0.30))
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))

    def paint(layers: Layers, anat: Anatomy) -> None:
        mottle = 0.75 + 0.25 * raster.smooth_noise(tex_rng, layers.x.shape[0], _texture_sigma(layers, 0.02))
        for side in (0, 1):
            cx, cy = lung_point(layers, side, 0.55, 0.12)
            haze = raster.gaussian_blob(layers.x, layers.y, cx, cy, spread, spread * 1.1)
            layers.add_opacity(level * haze * mottle * layers.lungs[side])

    return anat, paint


def emphysema(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    drop = float(rng.uniform(0.08, 0.13))
    cx, cy, ax, ay, ang = anat.heart
    changed = anat.with_changes(
        lung_base=[b + drop for b in anat.lung_base],
        lung_top=[t - 0.03 for t in anat.lung_top],
        lung_width=[w * 1.05 for w in anat.lung_width],
        body_width=anat.body_width * 1.04,
        dome_height=[d * float(rng.uniform(0.25, 0.4)) for d in anat.dome_height],
        heart=(cx - 0.03, cy + drop, ax * 0.82, ay * 1.05, ang + 8.0),
        markings=anat.markings * 0.4,
        lung_air=anat.lung_air * float(rng.uniform(1.18, 1.28)),
    )
    return changed, None


def fibrosis(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    level = float(rng.uniform(0.8, 0.95))
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))
    changed = anat.with_changes(
        lung_width=[w * 0.95 for w in anat.lung_width], lung_base=[b - 0.04 for b in anat.lung_base]
    )

    def paint(layers: Layers, anat: Anatomy) -> None:
        net = _net(layers, tex_rng, 0.05, 0.45)
        for side in (0, 1):
            zone = np.clip(layers.lung_v[side] - 0.25, 0, 1) ** 1.2 * (0.4 + 0.6 * layers.lung_h[side])
            layers.add_opacity(level * net * np.clip(zone * 1.6, 0, 1) * layers.lungs[side])

    return changed, paint


def pleural_thickening(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    sides = _sides(rng, 0.35)
    thick = float(rng.uniform(0.08, 0.12))
    apical = rng.random() < 0.35
    tex_rng = np.random.default_rng(rng.integers(0, 2**32))

    def paint(layers: Layers, anat: Anatomy) -> None:
        wave = 1.0 + 0.45 * raster.smooth_noise(tex_rng, layers.x.shape[0], _texture_sigma(layers, 0.04))
        for side in sides:
            depth = layers.pleura[side]
            zone = raster.smooth_inside((0.35 if apical else 0.8) - layers.lung_v[side], 0.08)
            rind = raster.smooth_inside(thick * wave - depth, _soft(layers)) * layers.lungs[side] * zone
            layers.add_opacity(rind)
            layers.extra += 0.25 * rind

    return anat, paint


def hernia(anat: Anatomy, rng: np.random.Generator) -> tuple[Anatomy, PaintFn | None]:
    radius = float(rng.uniform(0.15, 0.19))
    dx = float(rng.uniform(-0.05, 0.08))
    fluid = float(rng.uniform(0.35, 0.55))

    def paint(layers: Layers, anat: Anatomy) -> None:
        dome_top = min(anat.lung_base[i] - anat.dome_height[i] for i in (0, 1))
        cx, cy = dx, dome_top - radius * 0.55
        sac = raster.ellipse(layers.x, layers.y, cx, cy, radius * 1.15, radius, 0.0, _soft(layers) * 2)
        level_y = cy + radius * (1.0 - 2.0 * fluid)
        gas = sac * raster.smooth_inside(level_y - layers.y, _soft(layers))
        rim = raster.band(
            raster.ellipse_distance(layers.x, layers.y, cx, cy, radius * 1.15, radius), 0.012, _soft(layers)
        )
        layers.extra += 0.10 * rim - 0.50 * gas + 0.06 * (sac - gas)

    return anat, paint


NIH_PAINTERS: dict[str, Painter] = {
    "Atelectasis": atelectasis,
    "Cardiomegaly": cardiomegaly,
    "Effusion": effusion,
    "Infiltration": infiltration,
    "Mass": mass,
    "Nodule": nodule,
    "Pneumonia": pneumonia,
    "Pneumothorax": pneumothorax,
    "Consolidation": consolidation,
    "Edema": edema,
    "Emphysema": emphysema,
    "Fibrosis": fibrosis,
    "Pleural_Thickening": pleural_thickening,
    "Hernia": hernia,
}
