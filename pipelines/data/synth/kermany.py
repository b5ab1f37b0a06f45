"""Kermany's pediatric "Chest X-Ray Images (Pneumonia)" set as ``cxr synth`` writes it: the plan and the JPEG writer.

Plan (serial, deterministic in config and seed): images per official split and class (``pneumonia_class_counts``,
or ``pneumonia_images`` in the real proportions), grouped into patients that never cross a split: pneumonia
patients ``person<P>`` with one to six images (a few with both bacteria and virus files, as in the real set) and
normal studies ``IM-<NNNN>`` / ``NORMAL2-IM-<NNNN>`` with one to three. Each image draws its JPEG mode (grayscale,
sometimes RGB), size (longer side in ``pneumonia_image_size``, landscape mostly, never square) and quality from
``[seed, PLAN, STREAM_IMAGE, index]``.

Writer: a square render of a child's chest (``render`` with the pneumonia painters, or ``pool``) at
``render_size``, cropped a little and resized to the image's own width and height, fresh film grain from
``[seed, FILM, source, index]``, the site tag when ``data.synth.source_marker``, encoded as JPEG; so files depend
only on (config, seed), never on workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipelines.config import SynthConfig
from pipelines.data.synth import labels_sampler, layouts
from pipelines.data.synth.pneumonia_findings import CLASS_FINDINGS
from pipelines.data.synth.pool import pooled_image
from pipelines.data.synth.render import PLAN, SOURCE_CODES, render_image
from pipelines.data.synth.runner import Target

SOURCE = "pneumonia"
SPLITS = ("train", "val", "test")
STREAM_PATIENTS, STREAM_IMAGE = 6, 7  # plan streams (plan.py uses 1-4 under PLAN)
FILM = 6  # the writer's stream, beside render's ANATOMY/FINDING/IMAGE/PLAN (1-4) and pool's POOL (5)
RENDER_MAX = 512  # larger images are rendered at this size and resized: the anatomy is smooth, grain is added after
PNEUMONIA_IMAGES_P = (0.5, 0.22, 0.12, 0.07, 0.05, 0.04)  # 1..6 images of one pneumonia patient
NORMAL_IMAGES_P = (0.82, 0.13, 0.05)  # 1..3 images of one normal study
MIXED_P = 0.1  # a pneumonia patient with several images has both bacteria and virus files
NORMAL2_P = 0.4  # normal studies named NORMAL2-IM-... rather than IM-...
VERSIONED_P = 0.15  # a NORMAL2 study whose later images are named NORMAL2-IM-<NNNN>-0001-<K>
PORTRAIT_P = 0.15  # images taller than wide (most real films are landscape)


@dataclass(frozen=True)
class PneumoniaImage:
    index: int  # position in the plan; seeds the image's pixels
    split: str  # official split: train, val or test
    cls: str  # normal, bacterial or viral
    patient: int  # render key: one anatomy per patient (normal: per study)
    followup: int  # the image's position among its patient's
    name: str
    mode: str  # L or RGB
    width: int
    height: int
    quality: int  # JPEG quality

    @property
    def relpath(self) -> str:
        return layouts.pneumonia_relpath(self.split, self.cls, self.name)

    @property
    def findings(self) -> tuple[str, ...]:
        return CLASS_FINDINGS[self.cls]


@dataclass
class _Numbers:
    """Running numbers of the names: persons, pneumonia images, IM and NORMAL2-IM studies, render patients."""

    person: int = 0
    image: int = 0
    study: int = 0
    normal2: int = 0
    patient: int = 0


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, PLAN, *keys])


def class_counts(cfg: SynthConfig) -> dict[str, dict[str, int]]:
    """Images per official split and class; all zero when the config asks for no pneumonia set."""
    if cfg.pneumonia_class_counts is not None:
        return cfg.pneumonia_class_counts.model_dump()
    if not cfg.pneumonia_images:
        return {split: {"normal": 0, "bacterial": 0, "viral": 0} for split in SPLITS}
    return labels_sampler.pneumonia_split_counts(cfg.pneumonia_images)


def render_size(cfg: SynthConfig) -> int:
    return min(cfg.pneumonia_image_size[1], RENDER_MAX)


def _draw_count(rng: np.random.Generator, probabilities: tuple[float, ...], left: int) -> int:
    return min(1 + int(rng.choice(len(probabilities), p=probabilities)), left)


def _normal_names(n: int, rng: np.random.Generator, numbers: _Numbers) -> list[str]:
    if rng.random() < NORMAL2_P:
        numbers.normal2 += 1
        if n > 1 and rng.random() < VERSIONED_P:  # -0001, -0001-0001, -0001-0002, ...
            return [layouts.normal_image_name("NORMAL2", numbers.normal2, 1, version=k) for k in range(n)]
        return [layouts.normal_image_name("NORMAL2", numbers.normal2, k + 1) for k in range(n)]
    numbers.study += 1
    return [layouts.normal_image_name("IM", numbers.study, k + 1) for k in range(n)]


def _pneumonia_kinds(n: int, left: dict[str, int], rng: np.random.Generator) -> list[str]:
    """Classes of one pneumonia patient's ``n`` images, taken from what is ``left`` of the split's counts."""
    primary = "bacterial" if rng.random() < left["bacterial"] / (left["bacterial"] + left["viral"]) else "viral"
    other = "viral" if primary == "bacterial" else "bacterial"
    mixed = n > 1 and min(left.values()) > 0 and rng.random() < MIXED_P
    kinds = []
    for k in range(n):
        kind = other if mixed and k == n - 1 else primary
        kind = kind if left[kind] else (other if kind == primary else primary)
        left[kind] -= 1
        kinds.append(kind)
    return kinds


def _split_groups(counts: dict[str, int], rng: np.random.Generator, numbers: _Numbers) -> list[tuple]:
    """(patient, followup, class, name) of one split's images: normal studies, then pneumonia patients."""
    rows = []
    left = counts["normal"]
    while left:
        names = _normal_names(_draw_count(rng, NORMAL_IMAGES_P, left), rng, numbers)
        numbers.patient += 1
        rows += [(numbers.patient, k, "normal", name) for k, name in enumerate(names)]
        left -= len(names)
    sick = {"bacterial": counts["bacterial"], "viral": counts["viral"]}
    while sum(sick.values()):
        kinds = _pneumonia_kinds(_draw_count(rng, PNEUMONIA_IMAGES_P, sum(sick.values())), sick, rng)
        numbers.person += 1
        numbers.patient += 1
        for k, kind in enumerate(kinds):
            numbers.image += 1
            rows.append((numbers.patient, k, kind, layouts.pneumonia_image_name(kind, numbers.person, numbers.image)))
    return rows


def _geometry(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    longer = int(rng.integers(size[0], size[1] + 1))
    shorter = min(longer - 1, max(1, round(longer * float(rng.uniform(0.62, 0.95)))))
    return (shorter, longer) if rng.random() < PORTRAIT_P else (longer, shorter)


def plan_pneumonia(cfg: SynthConfig) -> list[PneumoniaImage]:
    """Every image of the set, in split order (train, val, test), normal studies before pneumonia patients."""
    counts = class_counts(cfg)
    numbers = _Numbers()
    images: list[PneumoniaImage] = []
    for split_code, split in enumerate(SPLITS):
        rng = _rng(cfg.seed, STREAM_PATIENTS, split_code)
        for patient, followup, cls, name in _split_groups(counts[split], rng, numbers):
            img_rng = _rng(cfg.seed, STREAM_IMAGE, len(images))
            mode = "RGB" if img_rng.random() < cfg.pneumonia_rgb_fraction else "L"
            width, height = _geometry(img_rng, cfg.pneumonia_image_size)
            quality = int(img_rng.integers(85, 96))
            images.append(
                PneumoniaImage(len(images), split, cls, patient, followup, name, mode, width, height, quality)
            )
    return images


def to_film(square: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Fit a square render to ``width`` x ``height``: trim up to 15% (both ends equally) off the axis that becomes
    the shorter side, stretch the rest (a rounder chest), and add fine film grain at the final resolution."""
    size = square.shape[0]
    keep = max(min(width, height) / max(width, height), 0.85)
    cut = int(round(size * (1.0 - keep) / 2.0))
    crop = square[cut : size - cut, :] if width > height else square[:, cut : size - cut]
    shrinking = width * height < crop.shape[0] * crop.shape[1]
    resized = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    grain = rng.normal(0.0, float(rng.uniform(0.004, 0.012)), resized.shape).astype(np.float32)
    return np.clip(resized + grain, 0.0, 1.0)


def pneumonia_pixels(img: PneumoniaImage, target: Target) -> np.ndarray:
    """The float32 [0, 1] pixels of one planned image, ``img.height`` x ``img.width``."""
    if target.pool:
        square = pooled_image(target.seed, SOURCE, img.index, img.findings, target.size, target.pool)
    else:
        square = render_image(target.seed, SOURCE, img.patient, img.index, img.findings, target.size, img.followup)
    film_rng = np.random.default_rng([target.seed, FILM, SOURCE_CODES[SOURCE], img.index])
    return target.finish(to_film(square, img.width, img.height, film_rng), SOURCE)


def write_pneumonia_image(img: PneumoniaImage, target: Target) -> None:
    path: Path = target.root / img.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(layouts.encode_jpeg(pneumonia_pixels(img, target), img.mode, img.quality))
