"""Vectorised raster helpers for the synthetic radiographs: soft masks, blurs and band-limited noise.

Everything works on float32 numpy arrays over a coordinate grid; there are no per-pixel Python loops.
Coordinates are normalised: ``x`` runs from -1 (image left) to +1 (image right) and ``y`` from -1 (top)
to +1 (bottom), whatever the pixel size, so shapes scale with the image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

Array = np.ndarray


def grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates ``(x, y)`` in [-1, 1], each of shape ``(size, size)``."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return x, y


def transform(x: Array, y: Array, shift: tuple[float, float], angle_deg: float, scale: float) -> tuple[Array, Array]:
    """Map image coordinates into a body frame that is shifted, rotated (degrees) and scaled."""
    theta = np.deg2rad(angle_deg)
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    xs, ys = x - shift[0], y - shift[1]
    return (cos * xs + sin * ys) / scale, (-sin * xs + cos * ys) / scale


def smooth_inside(distance: Array, softness: float) -> Array:
    """Soft indicator of ``distance > 0`` (a logistic edge ``softness`` wide)."""
    z = np.clip(distance / max(softness, 1e-6), -30.0, 30.0)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def ellipse_distance(x: Array, y: Array, cx: float, cy: float, ax: float, ay: float, angle_deg: float = 0.0) -> Array:
    """Approximate signed distance to an ellipse boundary: positive inside, in normalised units."""
    theta = np.deg2rad(angle_deg)
    dx, dy = x - cx, y - cy
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    r = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    return ((1.0 - r) * min(ax, ay)).astype(np.float32)


def ellipse(
    x: Array, y: Array, cx: float, cy: float, ax: float, ay: float, angle_deg: float = 0.0, softness: float = 0.01
) -> Array:
    """Soft-edged filled ellipse in [0, 1]."""
    return smooth_inside(ellipse_distance(x, y, cx, cy, ax, ay, angle_deg), softness)


def gaussian_blob(x: Array, y: Array, cx: float, cy: float, sx: float, sy: float) -> Array:
    """Unit-peak Gaussian bump."""
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2)).astype(np.float32)


def band(distance: Array, half_width: float, softness: float) -> Array:
    """Soft band where ``|distance| < half_width`` (a curve drawn with thickness)."""
    return smooth_inside(half_width - np.abs(distance), softness)


def blur(image: Array, sigma_px: float, sigma_x_px: float | None = None) -> Array:
    """Gaussian blur (rows by ``sigma_px``, columns by ``sigma_x_px``, default the same) via FFT.

    The image is reflect-padded first so nothing wraps around the borders.
    """
    sx = sigma_px if sigma_x_px is None else sigma_x_px
    if max(sigma_px, sx) <= 0.3:
        return image.astype(np.float32, copy=True)
    pad_y = int(min(3.0 * sigma_px + 1, image.shape[0] - 1))
    pad_x = int(min(3.0 * sx + 1, image.shape[1] - 1))
    padded = np.pad(image, ((pad_y, pad_y), (pad_x, pad_x)), mode="reflect")
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    kernel = np.exp(-2.0 * np.pi**2 * ((sigma_px * fy) ** 2 + (sx * fx) ** 2))
    out = np.fft.irfft2(np.fft.rfft2(padded) * kernel, s=padded.shape)
    return out[pad_y : padded.shape[0] - pad_y, pad_x : padded.shape[1] - pad_x].astype(np.float32)


def smooth_noise(
    rng: np.random.Generator, size: int | tuple[int, int], sigma_px: float, sigma_x_px: float | None = None
) -> Array:
    """Band-limited noise: white noise blurred by ``sigma_px``, rescaled to zero mean and unit std.

    Wide kernels are drawn on a coarser grid and upsampled bilinearly (same spectrum, far fewer FFT points).
    """
    shape = (size, size) if isinstance(size, int) else size
    sx = sigma_px if sigma_x_px is None else sigma_x_px
    factor = int(min(sigma_px, sx) // 2)
    if factor >= 2:
        coarse_shape = (-(-shape[0] // factor), -(-shape[1] // factor))
        coarse = smooth_noise(rng, coarse_shape, sigma_px / factor, sx / factor)
        fine = Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
        noise = np.asarray(fine, dtype=np.float32)
    else:
        noise = blur(rng.standard_normal(shape).astype(np.float32), sigma_px, sx)
    std = float(noise.std())
    return ((noise - noise.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def periodic_noise_1d(rng: np.random.Generator, angles: Array, frequencies: tuple[int, int], terms: int) -> Array:
    """A smooth random periodic function of an angle (radians) summed from ``terms`` random sinusoids."""
    freqs = rng.integers(frequencies[0], frequencies[1] + 1, size=terms)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=terms)
    amps = rng.uniform(0.5, 1.0, size=terms) / np.sqrt(terms)
    out = np.zeros_like(angles, dtype=np.float32)
    for f, p, a in zip(freqs, phases, amps, strict=True):
        out += np.float32(a) * np.cos(f * angles + p).astype(np.float32)
    return out


def spots(rng: np.random.Generator, size: int, sigma_px: float, threshold: float) -> Array:
    """Patchy blotches in [0, 1]: smooth noise passed through a soft threshold (higher = sparser)."""
    noise = smooth_noise(rng, size, sigma_px)
    return smooth_inside(noise - threshold, 0.35)
