"""A parametric frontal (PA) chest radiograph: anatomy parameters, rendered layers and the final image.

``sample_anatomy`` draws one patient's body (size, lungs, heart, ribs, exposure); findings may adjust those
parameters; ``render_layers`` turns them into density layers over a coordinate grid; findings paint
opacities into the layers; ``compose`` turns the layers into a float32 image in [0, 1] (bright = dense).

Conventions: side 0 is the image's left (the patient's right lung), side 1 the image's right (the patient's
left lung, where the heart bulges in a PA view). Inside each lung, ``sx`` is the distance from the midline
in the body frame, ``lung_v`` runs 0 (apex) to 1 (costophrenic angle) and ``lung_h`` 0 (medial) to 1
(lateral chest wall).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from pipelines.data.synth import raster

Array = np.ndarray
SIDES = (0, 1)
LUNG_AIR = 0.62  # density removed by a fully aerated lung


@dataclass
class Anatomy:
    """One patient's body; all lengths in the normalised body frame (x, y in [-1, 1])."""

    size: int
    shift: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0
    scale: float = 1.0
    body_width: float = 0.88
    lung_top: list[float] = field(default_factory=lambda: [-0.70, -0.70])
    lung_base: list[float] = field(default_factory=lambda: [0.40, 0.42])
    lung_width: list[float] = field(default_factory=lambda: [0.76, 0.76])
    lung_medial: list[float] = field(default_factory=lambda: [0.11, 0.11])
    dome_height: list[float] = field(default_factory=lambda: [0.22, 0.18])
    heart: tuple[float, float, float, float, float] = (0.12, 0.05, 0.40, 0.30, -12.0)  # cx, cy, ax, ay, angle
    mediastinum: float = 0.12
    rib_spacing: float = 0.16
    rib_phase: float = 0.0
    rib_strength: float = 0.14
    markings: float = 0.12
    lung_air: float = LUNG_AIR
    exposure: float = 1.2
    gamma: float = 1.0
    noise: float = 0.015
    female: bool = False
    stomach_bubble: bool = True
    marker: int = 0  # 0 none, 1 top-left, 2 top-right
    # acquisition: how the film was taken and processed (varies the picture far more than the patient)
    tilt: tuple[float, float] = (0.0, 0.0)  # amplitude and direction (radians) of a brightness gradient
    shading: float = 0.0  # amplitude of a smooth random brightness field
    collimation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # top, bottom, left, right border
    border_level: float = 0.0  # brightness of the collimated border

    def with_changes(self, **changes: object) -> Anatomy:
        return dataclasses.replace(self, **changes)


@dataclass
class Layers:
    """Density layers over the pixel grid; findings edit them before ``compose``."""

    x: Array  # body-frame coordinates
    y: Array
    body: Array
    lungs: Array  # (2, H, W) lung outlines, heart not removed
    air: Array  # (H, W) aerated fraction: lungs minus heart and mediastinum
    lung_v: Array  # (2, H, W)
    lung_h: Array  # (2, H, W)
    dome: Array  # (2, H, W): y of each hemidiaphragm under each pixel's column
    pleura: Array  # (2, H, W): distance inside the lateral and apical pleura (body-frame units)
    heart: Array
    bone: Array
    markings: Array
    extra: Array  # added soft-tissue density (fluid, masses on the chest wall, abdomen)
    opacity: Array = None  # type: ignore[assignment]  # lung opacity in [0, 1], filled by findings
    lucency: Array = None  # type: ignore[assignment]  # extra air (pneumothorax), in density units

    def __post_init__(self) -> None:
        if self.opacity is None:
            self.opacity = np.zeros_like(self.body)
        if self.lucency is None:
            self.lucency = np.zeros_like(self.body)

    def add_opacity(self, amount: Array) -> None:
        """Fill air spaces: opacities combine like independent absorbers, ``1 - prod(1 - o)``."""
        self.opacity = 1.0 - (1.0 - self.opacity) * (1.0 - np.clip(amount, 0.0, 1.0))


def sample_anatomy(rng: np.random.Generator, size: int) -> Anatomy:
    """Draw one patient's anatomy: body and lung size, pose, heart, ribs, exposure and noise."""
    lung_w = float(rng.uniform(0.68, 0.80))
    top = float(rng.uniform(-0.74, -0.64))
    base = float(rng.uniform(0.34, 0.46))
    heart_ax = float(rng.uniform(0.33, 0.38))
    return Anatomy(
        size=size,
        shift=(float(np.clip(rng.normal(0, 0.035), -0.08, 0.08)), float(np.clip(rng.normal(0.01, 0.04), -0.08, 0.1))),
        angle=float(np.clip(rng.normal(0, 2.0), -5, 5)),
        scale=float(rng.uniform(0.88, 1.04)),
        body_width=float(lung_w + rng.uniform(0.10, 0.16)),
        lung_top=[top + float(rng.normal(0, 0.01)), top + float(rng.normal(0, 0.01))],
        lung_base=[base, base + float(rng.uniform(0.0, 0.04))],
        lung_width=[lung_w * float(rng.uniform(0.97, 1.03)), lung_w * float(rng.uniform(0.97, 1.03))],
        lung_medial=[float(rng.uniform(0.10, 0.13)), float(rng.uniform(0.10, 0.13))],
        dome_height=[float(rng.uniform(0.19, 0.25)), float(rng.uniform(0.15, 0.21))],
        heart=(
            float(rng.uniform(0.10, 0.15)),
            base - float(rng.uniform(0.25, 0.31)),
            heart_ax,
            heart_ax * float(rng.uniform(0.70, 0.80)),
            float(rng.uniform(-16, -8)),
        ),
        mediastinum=float(rng.uniform(0.10, 0.13)),
        rib_spacing=float(rng.uniform(0.145, 0.175)),
        rib_phase=float(rng.uniform(0, 1)),
        rib_strength=float(rng.uniform(0.08, 0.12)),
        markings=float(rng.uniform(0.10, 0.14)),
        exposure=float(rng.uniform(1.0, 1.4)),
        gamma=float(rng.uniform(0.9, 1.12)),
        noise=float(rng.uniform(0.008, 0.02)),
        female=bool(rng.random() < 0.45),
        stomach_bubble=bool(rng.random() < 0.7),
        marker=int(rng.choice([0, 1, 2], p=[0.4, 0.3, 0.3])),
        **_sample_acquisition(rng),
    )


def _sample_acquisition(rng: np.random.Generator) -> dict[str, object]:
    """Film-taking variation: brightness gradients, shading, collimation borders."""
    collimated = rng.random() < 0.35
    return {
        "tilt": (float(rng.uniform(0.0, 0.12)), float(rng.uniform(0.0, 2.0 * np.pi))),
        "shading": float(rng.uniform(0.02, 0.06)),
        "collimation": tuple(float(v) for v in rng.uniform(0.0, 0.06, size=4) * collimated),
        "border_level": float(rng.choice([0.0, 0.85])) if collimated else 0.0,
    }


def jitter_for_followup(anat: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Small changes of pose and exposure between two images of the same patient."""
    return anat.with_changes(
        shift=(anat.shift[0] + float(rng.normal(0, 0.015)), anat.shift[1] + float(rng.normal(0, 0.015))),
        angle=anat.angle + float(rng.normal(0, 1.0)),
        scale=anat.scale * float(rng.uniform(0.98, 1.02)),
        exposure=anat.exposure * float(rng.uniform(0.95, 1.05)),
        noise=anat.noise * float(rng.uniform(0.8, 1.2)),
        rib_phase=anat.rib_phase + float(rng.normal(0, 0.04)),
    )


def _lung_geometry(anat: Anatomy, x: Array, y: Array, side: int, soft: float) -> tuple[Array, ...]:
    """Mask, vertical/lateral fractions, diaphragm height and depth below the lateral/apical pleura of a lung."""
    sx = x if side == 1 else -x
    top, base, w, m = anat.lung_top[side], anat.lung_base[side], anat.lung_width[side], anat.lung_medial[side]
    dh = anat.dome_height[side]
    yc = top + 0.72 * (base - top)
    t = np.clip((yc - y) / (yc - top), 0.0, 1.0)
    apex = m + 0.04 + (w - m - 0.04) * np.clip(1.0 - t**1.8, 0.0, 1.0) ** 0.62
    lateral = np.where(y < yc, apex, w + 0.05 * (y - yc))
    xc = m + 0.45 * (w - m)
    u = np.where(sx > xc, (sx - xc) / (w - xc), (xc - sx) / (xc - m) * 0.75)
    dome = base - dh * (1.0 - np.clip(u, 0.0, 1.4) ** 2)
    dist = np.minimum.reduce([sx - m, lateral - sx, y - top, dome - y])
    mask = raster.smooth_inside(dist, soft)
    v = np.clip((y - top) / (base - top), 0.0, 1.0)
    h = np.clip((sx - m) / (w - m), 0.0, 1.0)
    pleura = np.minimum(lateral - sx, (y - top) * 0.9)
    return mask, v.astype(np.float32), h.astype(np.float32), dome.astype(np.float32), pleura.astype(np.float32)


def _body_mask(anat: Anatomy, x: Array, y: Array, soft: float) -> Array:
    bw = anat.body_width
    torso = np.minimum(bw * (1.0 + 0.05 * y) - np.abs(x), y - (-0.86 + 0.16 * (np.abs(x) / bw) ** 2))
    neck = np.minimum(0.22 - np.abs(x), y + 1.5)
    return raster.smooth_inside(np.maximum(torso, neck), soft * 2.5)


def _ribs(anat: Anatomy, x: Array, y: Array, soft: float) -> Array:
    """Posterior ribs (strong arcs sloping down laterally) and anterior ribs (faint, sloping down medially)."""
    sx = np.abs(x)
    w = 0.5 * (anat.lung_width[0] + anat.lung_width[1])
    d = np.clip(sx / w, 0.0, 1.15)
    top = min(anat.lung_top) - 0.06
    region = raster.smooth_inside(np.minimum(y - top, (max(anat.lung_base) + 0.05) - y), soft * 3)
    region = region * raster.smooth_inside(w * 1.08 - sx, soft * 2) * raster.smooth_inside(sx - 0.05, soft * 2)
    post_u = (y - top - (-0.22 * d + 0.55 * d**2)) / anat.rib_spacing + anat.rib_phase
    post_u = post_u - 0.12 * np.clip(post_u, 0.0, None) ** 1.2  # ribs spread out lower down
    phase = post_u - np.floor(post_u)
    posterior = raster.smooth_inside(0.42 - np.abs(phase - 0.5) * 2 * 0.42 - 0.12, 0.05)
    cortex = np.exp(-(((phase - 0.29) / 0.05) ** 2)) + np.exp(-(((phase - 0.71) / 0.05) ** 2))
    ant_u = (y - top - 0.28 * np.clip(1.0 - d, 0.0, None) ** 1.5) / (anat.rib_spacing * 1.15) + anat.rib_phase * 0.7
    ant_phase = ant_u - np.floor(ant_u)
    anterior = np.exp(-(((ant_phase - 0.5) / 0.16) ** 2)) * raster.smooth_inside(d - 0.35, 0.1)
    ribs = anat.rib_strength * (0.8 * posterior + 0.35 * cortex + 0.3 * anterior)
    return (ribs * region).astype(np.float32)


def _clavicles_and_spine(anat: Anatomy, x: Array, y: Array, soft: float) -> Array:
    sx = np.abs(x)
    t = np.clip((sx - 0.06) / 0.70, 0.0, 1.0)
    clav_y = min(anat.lung_top) + 0.06 - 0.12 * t + 0.05 * np.sin(np.pi * t) ** 2
    clav = raster.band(y - clav_y, 0.032, soft) * raster.smooth_inside(0.78 - sx, soft * 3)
    clav *= raster.smooth_inside(sx - 0.06, soft)
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * (y / 0.095))
    spine = raster.band(x, 0.055, soft * 1.5) * (0.13 + 0.06 * vert)
    pedicles = raster.band(sx - 0.045, 0.012, soft) * raster.smooth_inside(vert - 0.6, 0.1) * 0.1
    return (0.28 * clav + spine + pedicles).astype(np.float32)


def _markings(anat: Anatomy, x: Array, y: Array, rng: np.random.Generator) -> Array:
    """Vessel markings: wavy branching lines radiating from each hilum, thinning towards the periphery.

    The lines are the zero crossings of noise drawn in polar coordinates around the hilum and smoothed far
    more along the radius than around it, so they run outwards, wander and merge like branching vessels.
    """
    out = np.zeros_like(x)
    n_theta, n_r = 240, 64
    for side in SIDES:
        s = 1.0 if side == 1 else -1.0
        hx, hy = s * (anat.lung_medial[side] + 0.12), anat.heart[1] - 0.22
        r = np.sqrt((x - hx) ** 2 + (y - hy) ** 2)
        theta = np.arctan2(y - hy, x - hx)
        field_ = raster.smooth_noise(rng, (n_theta, n_r), 1.75, 9.3)
        ti = np.clip(((theta + np.pi) / (2 * np.pi) * n_theta).astype(np.int64), 0, n_theta - 1)
        ri = np.clip((r / 1.2 * n_r).astype(np.int64), 0, n_r - 1)
        value = field_[ti, ri]
        width = 0.30 * (0.25 / (r + 0.25)) ** 1.2
        out += np.exp(-((value / width) ** 2)) * np.exp(-r / 0.5) * raster.smooth_inside(r - 0.04, 0.03)
    return (anat.markings * 1.6 * out).astype(np.float32)


def render_layers(anat: Anatomy, rng: np.random.Generator) -> Layers:
    """Draw the normal anatomy of ``anat`` into density layers (findings edit these afterwards)."""
    size = anat.size
    gx, gy = raster.grid(size)
    x, y = raster.transform(gx, gy, anat.shift, anat.angle, anat.scale)
    soft = max(0.006, 1.2 / size)
    geo = [_lung_geometry(anat, x, y, side, soft) for side in SIDES]
    lungs = np.stack([g[0] for g in geo])
    cx, cy, ax, ay, ang = anat.heart
    heart = raster.ellipse(x, y, cx, cy, ax, ay, ang, soft * 1.5)
    heart = np.maximum(heart, raster.ellipse(x, y, 0.13, min(anat.lung_top) + 0.42, 0.07, 0.06, 0.0, soft))
    mediast = raster.band(x - 0.01, anat.mediastinum, soft * 2) * raster.smooth_inside(cy - y, soft)
    air = lungs.sum(axis=0) * (1.0 - 0.92 * heart) * (1.0 - 0.9 * mediast)
    body = _body_mask(anat, x, y, soft)
    dome = np.stack([g[3] for g in geo])
    below = raster.smooth_inside(np.where(x < 0, y - dome[0], y - dome[1]), soft * 2)
    extra = 0.12 * below * body + 0.05 * heart
    carina = cy - 0.32
    trachea = raster.band(x - 0.01, 0.035, soft * 2) * raster.smooth_inside(carina - y, soft * 3)
    extra = extra - 0.22 * trachea * raster.smooth_inside(y + 1.0, soft)
    if anat.stomach_bubble:
        by = float(anat.lung_base[1] - anat.dome_height[1] + 0.12)
        bubble = raster.ellipse(x, y, 0.38, by, 0.11, 0.07, 0.0, soft * 2)
        extra = extra - 0.45 * bubble * (1 - raster.smooth_inside(by - 0.01 - y, soft))
    if anat.female:
        for s in (-1.0, 1.0):
            breast = raster.ellipse(x, y, s * 0.50, max(anat.lung_base) - 0.05, 0.36, 0.24, 0.0, 0.05)
            extra = extra + 0.09 * breast
    bone = _ribs(anat, x, y, soft) + _clavicles_and_spine(anat, x, y, soft)
    return Layers(
        x=x,
        y=y,
        body=body,
        lungs=lungs,
        air=np.clip(air, 0.0, 1.0).astype(np.float32),
        lung_v=np.stack([g[1] for g in geo]),
        lung_h=np.stack([g[2] for g in geo]),
        pleura=np.stack([g[4] for g in geo]),
        dome=dome,
        heart=heart,
        bone=bone,
        markings=_markings(anat, x, y, rng),
        extra=extra.astype(np.float32),
    )


def compose(anat: Anatomy, layers: Layers, rng: np.random.Generator) -> Array:
    """Turn density layers into the displayed radiograph: exposure curve, blur, marker and quantum noise."""
    aerated = layers.air * (1.0 - layers.opacity)
    thickness = np.sqrt(np.clip(1.0 - (layers.x / anat.body_width) ** 2, 0.0, 1.0))
    density = (
        layers.body * (0.45 + 0.6 * thickness + layers.extra)
        + layers.bone * layers.body
        - anat.lung_air * aerated * (0.7 + 0.3 * thickness)
        + layers.markings * aerated
        - layers.lucency
    )
    lo, hi, k = 0.22, 1.55, anat.exposure
    image = (1.0 - np.exp(-k * np.maximum(density - lo, 0.0))) / (1.0 - np.exp(-k * (hi - lo)))
    image = np.clip(image, 0.0, 1.0) ** anat.gamma
    image = raster.blur(image, max(0.5, anat.size / 400.0))
    image = _acquisition(anat, image, rng)
    if anat.marker:
        image = _draw_marker(image, anat.marker)
    sigma = anat.noise * (0.6 + 0.4 * image)
    image = image + sigma * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _acquisition(anat: Anatomy, image: Array, rng: np.random.Generator) -> Array:
    """Brightness gradient, smooth shading and collimation borders, in image (not body) coordinates."""
    size = anat.size
    gx, gy = raster.grid(size)
    amp, direction = anat.tilt
    shading = raster.smooth_noise(rng, size, size / 6.0)
    image = image + amp * (np.cos(direction) * gx + np.sin(direction) * gy) + anat.shading * shading
    top, bottom, left, right = anat.collimation
    inside = np.minimum.reduce([gy + 1.0 - 2 * top, 1.0 - 2 * bottom - gy, gx + 1.0 - 2 * left, 1.0 - 2 * right - gx])
    field_ = raster.smooth_inside(inside, 1.5 / size)
    return image * field_ + anat.border_level * (1.0 - field_)


def _draw_marker(image: Array, where: int) -> Array:
    """A bright side marker (the lead letter radiographers place) in a top corner."""
    size = image.shape[0]
    h, w = max(2, size // 28), max(2, size // 40)
    top = size // 20
    left = size // 20 if where == 1 else size - size // 20 - w
    out = image.copy()
    out[top : top + h, left : left + w] = 0.95
    out[top + h - max(1, h // 4) : top + h, left : left + 2 * w] = 0.95
    return out


def render_normal(anat: Anatomy, rng: np.random.Generator) -> Array:
    """A normal radiograph of ``anat`` (no findings)."""
    return compose(anat, render_layers(anat, rng), rng)
