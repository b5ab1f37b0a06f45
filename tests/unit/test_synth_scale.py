"""The full-size stand-in: real image and patient counts, the NIH spread of images per patient, exact COVID class
counts, and pooled rendering (fast, deterministic, every file different). No Ray."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipelines.config import ConfigError, SynthConfig, load_config
from pipelines.data.datasets.covid import COVID_CLASSES
from pipelines.data.synth import synthesize
from pipelines.data.synth.plan import make_plan
from pipelines.data.synth.pool import pooled_image
from tests.helpers import ROOT

COUNTS = {"COVID": 7, "Lung_Opacity": 5, "Normal": 11, "Viral Pneumonia": 3}


def test_scale_profile_asks_for_the_real_counts():
    synth = load_config(ROOT / "ray_config.yaml", "scale").data.synth
    assert (synth.nih_patients, synth.nih_images) == (30805, 112120)
    assert synth.covid_class_counts == {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}
    assert synth.images_per_patient == "nih" and synth.render_pool > 0


def test_nih_spread_hits_the_exact_total_with_a_long_tail():
    cfg = SynthConfig(nih_patients=3000, nih_images=10920, images_per_patient="nih", max_images_per_patient=184)
    plan = make_plan(cfg)
    per_patient = np.array(list(Counter(img.patient for img in plan.nih).values()))
    assert len(plan.nih) == 10920 and len(per_patient) == 3000
    assert 0.3 < (per_patient == 1).mean() < 0.5  # real NIH: 43% of patients have one image
    assert per_patient.max() > 20 and per_patient.max() <= 184
    names = [img.name for img in plan.nih]
    assert len(set(names)) == len(names)  # follow-up numbers stay unique per patient


def test_exact_covid_class_counts():
    plan = make_plan(SynthConfig(nih_patients=10, covid_class_counts=COUNTS))
    assert Counter(img.cls for img in plan.covid) == COUNTS


@pytest.mark.parametrize(
    "sets",
    [
        ["data.synth.nih_patients=10", "data.synth.nih_images=5"],
        ["data.synth.nih_patients=10", "data.synth.max_images_per_patient=2", "data.synth.nih_images=21"],
        ["data.synth.covid_class_counts={COVID: 3, Normal: 2}"],
    ],
)
def test_impossible_exact_counts_fail_at_start_up(sets):
    with pytest.raises(ConfigError, match="data.synth"):
        load_config(None, sets=sets)


def test_pooled_images_differ_but_stay_close_to_their_label_sets_base():
    a = pooled_image(0, "nih", 1, ("Effusion",), 64, 1)
    b = pooled_image(0, "nih", 2, ("Effusion",), 64, 1)
    other = pooled_image(0, "nih", 3, ("Cardiomegaly",), 64, 1)
    assert a.shape == (64, 64) and a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
    assert not np.array_equal(a, b)
    same = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert same > np.corrcoef(a.ravel(), other.ravel())[0, 1] and same > 0.8


def test_pooled_synthesis_is_the_same_whatever_the_workers(tmp_path):
    sets = [
        "data.synth.nih_patients=12", "data.synth.nih_images=30", "data.synth.images_per_patient=nih",
        "data.synth.nih_image_size=48", "data.synth.covid_image_size=48", "data.synth.render_pool=2",
        "data.synth.covid_class_counts={COVID: 3, Lung_Opacity: 2, Normal: 4, Viral Pneumonia: 2}",
    ]  # fmt: skip
    digests = []
    for workers in (1, 2):
        root = tmp_path / f"w{workers}"
        manifest = synthesize(load_config(None, sets=sets), root / "nih", root / "covid", workers=workers)
        assert manifest["nih"]["images"] == 30 and manifest["covid"]["images"] == 11
        files = sorted(p for p in root.rglob("*.png"))
        assert len(files) == 41
        digests.append({p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
        assert len(set(digests[-1].values())) == len(files)  # no two files alike
        assert all(Image.open(p).size == (48, 48) for p in files)
    assert digests[0] == digests[1]
    assert set(COVID_CLASSES) == {p.split("/")[-3] for p in digests[0] if p.startswith("covid/")}
