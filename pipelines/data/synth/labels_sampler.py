"""Label sampling: NIH finding sets per patient and follow-up, COVID class counts and Kermany pneumonia counts.

NIH: about half the images are ``No Finding``; Infiltration, Effusion and Atelectasis are the most common
findings and Hernia the rarest, as in the real v2020 labels, but every finding has a prevalence floor of
about 3% of images so that a demo-sized set has test positives for all 14. Findings co-occur as they do
clinically (Effusion with Cardiomegaly or Edema, Consolidation with Pneumonia, Mass with Nodule, ...), and
the follow-up images of one patient mostly keep that patient's findings, with an occasional change.

COVID: the class mix of the real v4 database (COVID 3616, Lung_Opacity 6012, Normal 10192, Viral Pneumonia
1345 images), with a 12% floor so the rarest class keeps enough images.

Kermany pneumonia: the real images per official split and class (train 1341 normal / 2530 bacterial / 1345 viral,
val 8 / 8 / 0, test 234 / 242 / 148), scaled to any total.
"""

from __future__ import annotations

import numpy as np

from pipelines.data.datasets.covid import COVID_CLASSES
from pipelines.data.datasets.nih import NIH14

# Per-image prevalence in Data_Entry_2017_v2020.csv (112,120 images).
NIH_REAL_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.1031,
    "Cardiomegaly": 0.0248,
    "Effusion": 0.1188,
    "Infiltration": 0.1774,
    "Mass": 0.0516,
    "Nodule": 0.0565,
    "Pneumonia": 0.0128,
    "Pneumothorax": 0.0473,
    "Consolidation": 0.0416,
    "Edema": 0.0205,
    "Emphysema": 0.0224,
    "Fibrosis": 0.0150,
    "Pleural_Thickening": 0.0302,
    "Hernia": 0.0020,
}
NIH_PREVALENCE_FLOOR = 0.03
NIH_FLOOR_OVERRIDES = {"Hernia": 0.025}  # keeps Hernia the rarest finding, as in the real set
NORMAL_PATIENT_P = 0.52

# Weights of a patient's primary findings, calibrated (by simulating this sampler) so that the per-image
# prevalence lands near max(real prevalence, floor) with about half the images being No Finding.
PRIMARY_WEIGHTS: dict[str, float] = {
    "Atelectasis": 0.098,
    "Cardiomegaly": 0.035,
    "Effusion": 0.129,
    "Infiltration": 0.267,
    "Mass": 0.064,
    "Nodule": 0.066,
    "Pneumonia": 0.032,
    "Pneumothorax": 0.061,
    "Consolidation": 0.051,
    "Edema": 0.039,
    "Emphysema": 0.043,
    "Fibrosis": 0.043,
    "Pleural_Thickening": 0.036,
    "Hernia": 0.035,
}
PRIMARY_COUNT_P = (0.70, 0.22, 0.08)  # one, two or three primary findings in an abnormal patient

# (finding, partner, probability that the partner comes along)
CO_OCCURRENCE: tuple[tuple[str, str, float], ...] = (
    ("Cardiomegaly", "Effusion", 0.35),
    ("Edema", "Effusion", 0.40),
    ("Edema", "Cardiomegaly", 0.20),
    ("Consolidation", "Pneumonia", 0.15),
    ("Pneumonia", "Infiltration", 0.25),
    ("Pneumonia", "Consolidation", 0.15),
    ("Mass", "Nodule", 0.20),
    ("Nodule", "Mass", 0.10),
    ("Effusion", "Atelectasis", 0.25),
    ("Atelectasis", "Effusion", 0.20),
    ("Emphysema", "Pneumothorax", 0.12),
    ("Fibrosis", "Pleural_Thickening", 0.20),
    ("Infiltration", "Atelectasis", 0.08),
)
FOLLOWUP_CHANGE_P = 0.25  # a follow-up image drops or gains one finding
NORMAL_FOLLOWUP_ONSET_P = 0.08  # a normal patient's follow-up shows a new finding

COVID_REAL_COUNTS: dict[str, int] = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}
COVID_CLASS_FLOOR = 0.12


def _draw_finding(rng: np.random.Generator, exclude: set[str]) -> str | None:
    names = [name for name in NIH14 if name not in exclude]
    if not names:
        return None
    weights = np.array([PRIMARY_WEIGHTS[name] for name in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _with_partners(rng: np.random.Generator, findings: set[str]) -> set[str]:
    """Add co-occurring partners (one pass, in table order, so the result is reproducible)."""
    out = set(findings)
    for finding, partner, p in CO_OCCURRENCE:
        if finding in findings and partner not in out and rng.random() < p:
            out.add(partner)
    return out


def sample_patient_findings(rng: np.random.Generator) -> set[str]:
    """A patient's baseline finding set (empty = No Finding)."""
    if rng.random() < NORMAL_PATIENT_P:
        return set()
    count = 1 + int(rng.choice(len(PRIMARY_COUNT_P), p=PRIMARY_COUNT_P))
    primary: set[str] = set()
    for _ in range(count):
        name = _draw_finding(rng, primary)
        if name is not None:
            primary.add(name)
    return _with_partners(rng, primary)


def evolve_findings(rng: np.random.Generator, previous: set[str]) -> set[str]:
    """The next follow-up's findings: mostly unchanged, sometimes one finding more or less."""
    if not previous:
        if rng.random() < NORMAL_FOLLOWUP_ONSET_P:
            name = _draw_finding(rng, set())
            return {name} if name else set()
        return set()
    if rng.random() >= FOLLOWUP_CHANGE_P:
        return set(previous)
    if rng.random() < 0.5:
        dropped = sorted(previous)[int(rng.integers(0, len(previous)))]
        return set(previous) - {dropped}
    name = _draw_finding(rng, previous)
    return set(previous) | ({name} if name else set())


def sample_patient_series(rng: np.random.Generator, n_images: int) -> list[tuple[str, ...]]:
    """Finding sets for a patient's ``n_images`` follow-ups, each sorted in the NIH order."""
    current = sample_patient_findings(rng)
    series = []
    for index in range(n_images):
        if index:
            current = evolve_findings(rng, current)
        series.append(tuple(name for name in NIH14 if name in current))
    return series


def nih_target_prevalence() -> dict[str, float]:
    """The per-image prevalence the sampler aims at: the real one, raised to the floor."""
    return {
        name: max(p, NIH_FLOOR_OVERRIDES.get(name, NIH_PREVALENCE_FLOOR)) for name, p in NIH_REAL_PREVALENCE.items()
    }


def covid_class_fractions(floor: float = COVID_CLASS_FLOOR) -> dict[str, float]:
    """Real class fractions with every class raised to ``floor`` and the others scaled down to make room."""
    total = sum(COVID_REAL_COUNTS.values())
    fractions = {name: COVID_REAL_COUNTS[name] / total for name in COVID_CLASSES}
    fixed: set[str] = set()
    for _ in range(len(fractions)):
        low = {name for name, f in fractions.items() if f < floor and name not in fixed}
        if not low:
            break
        fixed |= low
        free = sum(f for name, f in fractions.items() if name not in fixed)
        room = 1.0 - floor * len(fixed)
        fractions = {name: floor if name in fixed else f * room / free for name, f in fractions.items()}
    return fractions


def covid_class_counts(total: int, floor: float = COVID_CLASS_FLOOR) -> dict[str, int]:
    """Exact per-class image counts (largest remainder), every class getting at least one image."""
    fractions = covid_class_fractions(floor)
    raw = {name: fractions[name] * total for name in COVID_CLASSES}
    counts = {name: max(1, int(np.floor(value))) for name, value in raw.items()}
    by_remainder = sorted(COVID_CLASSES, key=lambda name: (-(raw[name] - np.floor(raw[name])), name))
    index = 0
    while sum(counts.values()) < total:
        counts[by_remainder[index % len(by_remainder)]] += 1
        index += 1
    while sum(counts.values()) > total:
        largest = max(COVID_CLASSES, key=lambda name: counts[name])
        counts[largest] -= 1
    return counts


# Kermany's pneumonia set (v2 on Mendeley / Kaggle): images per official split and class (5,856 in all).
PNEUMONIA_REAL_COUNTS: dict[str, dict[str, int]] = {
    "train": {"normal": 1341, "bacterial": 2530, "viral": 1345},
    "val": {"normal": 8, "bacterial": 8, "viral": 0},
    "test": {"normal": 234, "bacterial": 242, "viral": 148},
}


def pneumonia_split_counts(total: int) -> dict[str, dict[str, int]]:
    """``total`` images over the official splits and classes in the real proportions (largest remainder); every
    cell the real set fills gets at least one image, so a small set keeps its tiny val folder."""
    cells = [(split, cls) for split, classes in PNEUMONIA_REAL_COUNTS.items() for cls in classes]
    real = {cell: PNEUMONIA_REAL_COUNTS[cell[0]][cell[1]] for cell in cells}
    filled = [cell for cell in cells if real[cell]]
    if total < len(filled):
        raise ValueError(f"{total} pneumonia images cannot fill the {len(filled)} split/class cells of the real set")
    raw = {cell: total * real[cell] / sum(real.values()) for cell in cells}
    counts = {cell: max(int(cell in filled), int(np.floor(raw[cell]))) for cell in cells}
    by_remainder = sorted(filled, key=lambda cell: (-(raw[cell] - np.floor(raw[cell])), cells.index(cell)))
    index = 0
    while sum(counts.values()) < total:
        counts[by_remainder[index % len(by_remainder)]] += 1
        index += 1
    while sum(counts.values()) > total:  # the floors of one pushed the sum over: take from the largest cells
        counts[max(filled, key=lambda cell: (counts[cell], -cells.index(cell)))] -= 1
    return {split: {cls: counts[(split, cls)] for cls in classes} for split, classes in PNEUMONIA_REAL_COUNTS.items()}
