"""Everything about a synthetic dataset except its pixels: patients, labels, splits, file names, plants.

Planning is cheap, serial and deterministic in (config, seed); rendering the planned images is the
expensive part and may run in any number of processes without changing a byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pipelines.config import SynthConfig
from pipelines.data.datasets.covid import COVID_CLASSES
from pipelines.data.datasets.nih import NIH14, format_nih_labels
from pipelines.data.synth import labels_sampler, layouts
from pipelines.data.synth.render import PLAN

STREAM_PATIENT, STREAM_NIH_IMAGE, STREAM_COVID, STREAM_PLANTS = 1, 2, 3, 4
CORRUPT_KINDS: tuple[tuple[str, str], ...] = (
    ("nih", "empty"),
    ("covid", "empty"),
    ("nih", "truncated"),
    ("covid", "truncated"),
    ("nih", "not_an_image"),
    ("covid", "not_an_image"),
    ("nih", "bad_label"),
    ("nih", "not_in_csv"),
)
OPACITY_FINDINGS = frozenset({"Pneumonia", "Consolidation", "Infiltration", "Mass", "Nodule", "Edema", "Atelectasis"})
MIN_SPLIT_PATIENTS = 4  # per finding, in each of train_val and test, where the data allow it


@dataclass(frozen=True)
class NihImage:
    index: int  # position in name order; seeds the image's pixels
    patient: int
    followup: int
    findings: tuple[str, ...]
    age: int
    sex: str
    view: str
    geometry: tuple[str, str, str, str]
    mode: str
    archive: int
    test: bool
    plant: str | None = None

    @property
    def name(self) -> str:
        return layouts.nih_image_name(self.patient, self.followup)

    @property
    def relpath(self) -> str:
        return f"{layouts.nih_archive_folder(self.archive)}/{self.name}"

    def csv_row(self) -> list[object]:
        labels = format_nih_labels(int(name in self.findings) for name in NIH14)
        if self.plant == "bad_label":
            labels = "Bogus" if not self.findings else f"{labels}|Bogus"
        width, height, sx, sy = self.geometry
        return [self.name, labels, self.followup, self.patient, self.age, self.sex, self.view, width, height, sx, sy]


@dataclass(frozen=True)
class CovidImage:
    index: int  # over all classes; seeds the image's pixels
    cls: str
    number: int  # from 1 within the class
    mode: str
    plant: str | None = None
    duplicate_of: str | None = None  # NIH relpath this image copies
    brightness: float = 1.0

    @property
    def relpath(self) -> str:
        return layouts.covid_relpath(self.cls, self.number)


@dataclass
class Plan:
    nih: list[NihImage]
    covid: list[CovidImage]
    duplicates: list[dict[str, str]] = field(default_factory=list)
    corrupt: list[dict[str, str]] = field(default_factory=list)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, PLAN, *keys])


def _odd_mode(rng: np.random.Generator, fraction: float, odd: tuple[str, ...]) -> str:
    """``L`` mostly; each odd mode with probability ``fraction`` (at most an equal share)."""
    share = min(fraction, 1.0 / len(odd))
    u = float(rng.random())
    return odd[int(u // share)] if share > 0 and u < share * len(odd) else "L"


def _images_per_patient(rng: np.random.Generator, cfg: SynthConfig) -> int:
    """The first draw of a patient's stream: how many images the patient has."""
    if cfg.images_per_patient == "uniform":
        return int(rng.integers(1, cfg.max_images_per_patient + 1))
    # 1 + floor(lognormal): P(1 image) ~ 0.44 and a long tail, as in NIH ChestX-ray14 (mean 3.64, at most 184)
    return int(min(1 + np.floor(rng.lognormal(0.2, 1.3)), cfg.max_images_per_patient))


def _fit_total(counts: np.ndarray, total: int, most: int, rng: np.random.Generator) -> np.ndarray:
    """Add or remove single follow-ups (patients drawn in proportion to their counts) until ``total`` is met."""
    counts = counts.copy()
    while (gap := total - int(counts.sum())) != 0:
        room = counts < most if gap > 0 else counts > 1
        weights = np.where(room, counts, 0).astype(float)
        picks = rng.choice(len(counts), size=min(abs(gap), int(room.sum())), replace=False, p=weights / weights.sum())
        counts[picks] += 1 if gap > 0 else -1
    return counts


def _patient_counts(cfg: SynthConfig) -> np.ndarray:
    counts = [_images_per_patient(_rng(cfg.seed, STREAM_PATIENT, p), cfg) for p in range(1, cfg.nih_patients + 1)]
    counts = np.array(counts, dtype=np.int64)
    if cfg.nih_images is not None:
        counts = _fit_total(counts, cfg.nih_images, cfg.max_images_per_patient, _rng(cfg.seed, STREAM_PLANTS, 3))
    return counts


def plan_nih(cfg: SynthConfig) -> list[NihImage]:
    """Patients 1..N with their images (``images_per_patient``, ``nih_images``), labels, demographics, modes,
    archives and the test split."""
    images: list[NihImage] = []
    geometries = [g for g, _ in layouts.NIH_ORIGINAL_GEOMETRY]
    weights = np.array([w for _, w in layouts.NIH_ORIGINAL_GEOMETRY])
    counts = _patient_counts(cfg)
    for patient in range(1, cfg.nih_patients + 1):
        rng = _rng(cfg.seed, STREAM_PATIENT, patient)
        _images_per_patient(rng, cfg)  # the count's draw, kept so the rest of the stream stays as it was
        count = int(counts[patient - 1])
        series = labels_sampler.sample_patient_series(rng, count)
        age = int(np.clip(round(rng.normal(47.0, 16.5)), 1, 95))
        sex = "M" if rng.random() < 0.56 else "F"
        test = bool(rng.random() < cfg.nih_test_patient_fraction)
        for followup, findings in enumerate(series):
            index = len(images)
            img_rng = _rng(cfg.seed, STREAM_NIH_IMAGE, index)
            images.append(NihImage(
                index=index, patient=patient, followup=followup, findings=findings,
                age=min(age + int(followup * img_rng.uniform(0.0, 0.6)), 99),
                sex=sex, view="AP" if img_rng.random() < 0.4 else "PA",
                geometry=geometries[int(img_rng.choice(len(geometries), p=weights / weights.sum()))],
                mode=_odd_mode(img_rng, cfg.odd_mode_fraction, ("RGBA", "I;16")),
                archive=index // cfg.nih_images_per_archive + 1, test=test,
            ))  # fmt: skip
    return _repair_split(images, _rng(cfg.seed, STREAM_PLANTS, 0))


def _repair_split(images: list[NihImage], rng: np.random.Generator) -> list[NihImage]:
    """Move whole patients so both splits are non-empty and hold a few positive patients of every finding."""
    test_of = {img.patient: img.test for img in images}
    findings_of: dict[int, set[str]] = {}
    for img in images:
        findings_of.setdefault(img.patient, set()).update(img.findings)
    patients = sorted(test_of)
    order = [patients[i] for i in rng.permutation(len(patients))]
    for _ in range(3):  # a move for one finding can undo another's; a few passes settle it
        for name in (None, *NIH14):  # None: the split as a whole
            holders = [p for p in order if name is None or name in findings_of[p]]
            for want_test in (True, False):
                have = sum(1 for p in holders if test_of[p] == want_test)
                need = min(MIN_SPLIT_PATIENTS if name else 1, len(holders) // 2) - have
                movable = sorted((p for p in holders if test_of[p] != want_test), key=lambda p: len(findings_of[p]))
                for p in movable[: max(need, 0)]:
                    test_of[p] = want_test
    return [replace(img, test=test_of[img.patient]) for img in images]


def plan_covid(cfg: SynthConfig) -> list[CovidImage]:
    counts = cfg.covid_class_counts or labels_sampler.covid_class_counts(cfg.covid_images)
    images: list[CovidImage] = []
    for cls in COVID_CLASSES:
        for number in range(1, counts[cls] + 1):
            rng = _rng(cfg.seed, STREAM_COVID, len(images))
            images.append(CovidImage(len(images), cls, number, _odd_mode(rng, cfg.odd_mode_fraction, ("RGB",))))
    return images


def _plant_duplicates(plan: Plan, count: int, rng: np.random.Generator) -> None:
    clean = [img for img in plan.nih if img.mode == "L" and img.plant is None]
    pools = {
        "Normal": [img for img in clean if not img.findings],
        "Lung_Opacity": [img for img in clean if OPACITY_FINDINGS & set(img.findings)],
    }
    targets = {cls: [c for c in plan.covid if c.cls == cls and c.plant is None] for cls in pools}
    used: set[int] = set()
    for k in range(count):
        preferred = ("Normal", "Lung_Opacity") if k % 2 == 0 else ("Lung_Opacity", "Normal")
        for cls in preferred:
            sources = [img for img in pools[cls] if img.index not in used]
            if sources and targets[cls]:
                break
        else:
            return
        source = sources[int(rng.integers(0, len(sources)))]
        target = targets[cls].pop(int(rng.integers(0, len(targets[cls]))))
        used.add(source.index)
        brightness = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.07) + 1.0)
        plan.covid[target.index] = replace(target, duplicate_of=source.relpath, brightness=brightness)
        plan.duplicates.append({"nih": source.relpath, "covid": target.relpath})


def _plant_corrupt(plan: Plan, count: int, cfg: SynthConfig, rng: np.random.Generator) -> None:
    dup_sources = {d["nih"] for d in plan.duplicates}
    nih_free = [img.index for img in plan.nih if img.plant is None and img.relpath not in dup_sources]
    covid_free = [c.index for c in plan.covid if c.plant is None and c.duplicate_of is None]
    extra = 0
    for k in range(count):
        source, kind = CORRUPT_KINDS[k % len(CORRUPT_KINDS)]
        if kind == "not_in_csv":
            last = plan.nih[-1]
            extra += 1
            img = replace(last, index=len(plan.nih), patient=cfg.nih_patients + extra, followup=0, findings=(),
                          mode="L", plant=kind, test=False)  # fmt: skip
            plan.nih.append(img)
        else:
            pool = nih_free if source == "nih" else covid_free
            if not pool:
                continue
            index = pool.pop(int(rng.integers(0, len(pool))))
            records = plan.nih if source == "nih" else plan.covid
            img = records[index] = replace(records[index], plant=kind)
        plan.corrupt.append({"source": source, "path": img.relpath, "kind": kind})


def make_plan(cfg: SynthConfig) -> Plan:
    """The full plan for ``cfg``: NIH and COVID images, then near-duplicates, then corrupt plants."""
    plan = Plan(nih=plan_nih(cfg), covid=plan_covid(cfg))
    _plant_duplicates(plan, cfg.near_duplicates, _rng(cfg.seed, STREAM_PLANTS, 1))
    _plant_corrupt(plan, cfg.corrupt_files, cfg, _rng(cfg.seed, STREAM_PLANTS, 2))
    return plan
