"""The synthetic data generator: layouts, CSV and split lists, image modes, plants, determinism, refusal.

No Ray. One tiny dataset (20 patients at 64 px, 16 COVID images at 48 px) is generated once per module.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from models.labels import LabelError
from pipelines.config import SynthConfig, load_config
from pipelines.data.datasets.covid import COVID_CLASSES
from pipelines.data.datasets.covid import DATASET_FOLDER as COVID_DATASET_FOLDER
from pipelines.data.datasets.nih import NIH14, parse_nih_labels
from pipelines.data.synth import MANIFEST_NAME, labels_sampler, layouts, synthesize
from pipelines.data.synth.__main__ import main
from pipelines.data.synth.plan import make_plan, plan_nih
from pipelines.data.synth.render import PAINTERS, render_image
from tests.helpers import REAL_SAMPLES, ROOT

REAL_NIH_CSV = REAL_SAMPLES / "nih" / "Data_Entry_2017_v2020.csv.gz"
TINY = [
    "data.synth.seed=3",
    "data.synth.nih_patients=20",
    "data.synth.max_images_per_patient=3",
    "data.synth.nih_image_size=64",
    "data.synth.nih_images_per_archive=10",
    "data.synth.covid_images=16",
    "data.synth.covid_image_size=48",
    "data.synth.odd_mode_fraction=0.3",
    "data.synth.near_duplicates=2",
    "data.synth.corrupt_files=8",
    "data.synth.pneumonia_images=8",  # the smallest Kermany set (tests/unit/test_synth_pneumonia.py covers it)
    "data.synth.pneumonia_image_size=[48,64]",
]
NAME = re.compile(r"^images_(\d{3})/images/(\d{8})_(\d{3})\.png$")


def tiny_config(*extra: str):
    return load_config(None, sets=[*TINY, *extra])


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    manifest = synthesize(tiny_config(), root / "nih", root / "covid", workers=1)
    return root, manifest


@pytest.fixture(scope="module")
def csv_rows(dataset):
    root, _ = dataset
    with open(root / "nih" / layouts.NIH_CSV_NAME, newline="") as handle:
        return list(csv.DictReader(handle))


def _corrupt(manifest, source=None, kind=None):
    return [c for c in manifest["corrupt"] if (source is None or c["source"] == source) and (kind in (None, c["kind"]))]


# ------------------------------------------------------------------------------------------------ NIH


def test_nih_images_sit_in_numbered_archives_in_image_order(dataset, csv_rows):
    root, manifest = dataset
    paths = sorted(p.relative_to(root / "nih").as_posix() for p in (root / "nih").rglob("*.png"))
    assert paths and all(NAME.match(p) for p in paths), paths[:5]
    listed = [NAME.match(p) for p in paths if p.rsplit("/", 1)[1] in {r["Image Index"] for r in csv_rows}]
    listed.sort(key=lambda m: (int(m.group(2)), int(m.group(3))))
    archives = [int(m.group(1)) for m in listed]
    assert archives == [i // 10 + 1 for i in range(len(listed))]
    assert manifest["nih"]["archives"] == max(archives) >= 2
    per_patient = Counter(int(m.group(2)) for m in listed)
    assert set(per_patient) == set(range(1, 21)) and max(per_patient.values()) <= 3
    for m in listed:  # follow-ups of a patient are numbered 000, 001, ... without gaps
        assert int(m.group(3)) < per_patient[int(m.group(2))]


def test_csv_header_and_value_formats_match_the_real_file(dataset, csv_rows):
    root, _ = dataset
    text = (root / "nih" / layouts.NIH_CSV_NAME).read_text()
    header = text.split("\n", 1)[0]
    assert header == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    assert text.endswith("\n") and "\r" not in text
    if REAL_NIH_CSV.is_file():
        with gzip.open(REAL_NIH_CSV, "rt") as handle:
            assert header == handle.readline().rstrip("\n")
    assert len(next(csv.reader(io.StringIO(header)))) == 11
    for row in csv_rows:
        assert row["Image Index"] == f"{int(row['Patient ID']):08d}_{int(row['Follow-up #']):03d}.png"
        assert re.fullmatch(r"[1-9]\d*", row["Patient ID"]) and re.fullmatch(r"\d+", row["Follow-up #"])
        assert re.fullmatch(r"\d{1,3}", row["Patient Age"])
        assert row["Patient Gender"] in ("M", "F") and row["View Position"] in ("PA", "AP")
        assert int(row["OriginalImage[Width"]) > 1000 and int(row["Height]"]) > 1000
        assert 0.1 < float(row["OriginalImagePixelSpacing[x"]) == float(row["y]"]) < 0.2


def test_labels_parse_except_the_planted_bad_label(dataset, csv_rows):
    _, manifest = dataset
    bad = {Path(c["path"]).name for c in _corrupt(manifest, "nih", "bad_label")}
    assert len(bad) == 1
    for row in csv_rows:
        if row["Image Index"] in bad:
            assert "Bogus" in row["Finding Labels"]
            with pytest.raises(LabelError):
                parse_nih_labels(row["Finding Labels"])
        else:
            parse_nih_labels(row["Finding Labels"])
    counts = Counter(name for r in csv_rows if r["Image Index"] not in bad for name in r["Finding Labels"].split("|"))
    for name, planned in manifest["nih"]["findings"].items():  # the manifest counts the bad row's true labels
        assert 0 <= planned - counts[name] <= 1, name


def test_split_lists_are_patient_disjoint_and_cover_every_row(dataset, csv_rows):
    root, manifest = dataset
    lists = {}
    for name in (layouts.NIH_TRAIN_VAL_LIST, layouts.NIH_TEST_LIST):
        text = (root / "nih" / name).read_text()
        assert not text.endswith("\n")  # like the real lists
        lists[name] = text.split("\n")
    train, test = set(lists[layouts.NIH_TRAIN_VAL_LIST]), set(lists[layouts.NIH_TEST_LIST])
    assert train and test and not train & test
    assert train | test == {r["Image Index"] for r in csv_rows}
    assert len(test) == manifest["nih"]["test_images"]

    def patients(names):
        return {n.split("_")[0] for n in names}

    assert not patients(train) & patients(test)


def test_odd_modes_are_written_when_the_fraction_is_high(dataset):
    root, manifest = dataset
    modes = Counter()
    for path in (root / "nih").rglob("*.png"):
        try:
            with Image.open(path) as image:
                image.load()
                modes[image.mode] += 1
                if image.mode == "RGBA":
                    assert np.asarray(image)[..., 3].min() == 255
                if image.mode.startswith("I"):
                    assert np.asarray(image).max() > 255  # scaled to the 16-bit range
                assert image.size == (64, 64)
        except OSError:
            continue  # planted corrupt files
    assert modes["L"] and modes["RGBA"] and (modes["I;16"] + modes["I"])
    covid_modes = Counter(Image.open(p).mode for p in (root / "covid").rglob("*.png") if p.stat().st_size > 1000)
    assert covid_modes["RGB"] and covid_modes["L"]
    assert manifest["nih"]["modes"]["RGBA"] >= 1


# ---------------------------------------------------------------------------------------------- COVID


def test_covid_layout_names_sizes_and_class_floor(dataset):
    root, manifest = dataset
    dataset_root = root / "covid" / COVID_DATASET_FOLDER
    assert sorted(p.name for p in dataset_root.iterdir()) == sorted(COVID_CLASSES)
    counts = {}
    for cls in COVID_CLASSES:
        files = sorted((dataset_root / cls / "images").iterdir())
        numbers = sorted(int(re.fullmatch(rf"{re.escape(cls)}-(\d+)\.png", p.name).group(1)) for p in files)
        assert numbers == list(range(1, len(files) + 1))
        counts[cls] = len(files)
        for path in files:
            if path.stat().st_size > 1000:
                assert Image.open(path).size == (48, 48)
    assert counts == manifest["covid"]["classes"] and sum(counts.values()) == 16
    big = labels_sampler.covid_class_counts(800)
    assert min(big.values()) >= 0.12 * 800 and big["Normal"] == max(big.values())


# --------------------------------------------------------------------------------------------- plants


def test_manifest_sits_beside_the_nih_folder_and_records_the_plants(dataset):
    root, manifest = dataset
    assert json.loads((root / MANIFEST_NAME).read_text()) == manifest
    assert manifest["seed"] == 3 and manifest["nih"]["dir"] == "nih" and manifest["covid"]["dir"] == "covid"
    kinds = Counter((c["source"], c["kind"]) for c in manifest["corrupt"])
    assert len(kinds) == 8 and set(kinds.values()) == {1}
    assert len(manifest["duplicates"]) == 2


def test_corrupt_files_are_broken_in_the_recorded_way(dataset, csv_rows):
    root, manifest = dataset
    names = {r["Image Index"] for r in csv_rows}
    for plant in manifest["corrupt"]:
        path = root / plant["source"] / plant["path"]
        assert path.is_file(), plant
        data = path.read_bytes()
        if plant["kind"] == "empty":
            assert data == b""
        elif plant["kind"] == "truncated":
            assert data.startswith(b"\x89PNG") and len(data) > 20
            with pytest.raises(OSError), Image.open(path) as image:
                image.load()
        elif plant["kind"] == "not_an_image":
            assert not data.startswith(b"\x89PNG")
            with pytest.raises(OSError):
                Image.open(path)
        else:
            Image.open(path).load()  # bad_label and not_in_csv are valid images
        if plant["source"] == "nih":
            assert (path.name in names) == (plant["kind"] != "not_in_csv")


def test_near_duplicates_keep_their_perceptual_hash(dataset):
    root, manifest = dataset
    for pair in manifest["duplicates"]:
        assert pair["covid"].split("/")[1] in ("Normal", "Lung_Opacity")
        hashes = []
        for path in (root / "nih" / pair["nih"], root / "covid" / pair["covid"]):
            with Image.open(path) as image:
                hashes.append(imagehash.phash(image.convert("L").resize((64, 64), Image.Resampling.BILINEAR)))
        assert hashes[0] - hashes[1] <= 4
        a = np.asarray(Image.open(root / "nih" / pair["nih"]).convert("L").resize((48, 48)), dtype=float)
        b = np.asarray(Image.open(root / "covid" / pair["covid"]).convert("L"), dtype=float)
        assert 0 < np.abs(a - b).mean() < 20  # changed, but the same picture


# ------------------------------------------------------------------------------- determinism, refusal


def test_same_seed_gives_identical_bytes_whatever_the_workers(dataset, tmp_path):
    root, _ = dataset
    synthesize(tiny_config(), tmp_path / "nih", tmp_path / "covid", workers=2)
    for source in ("nih", "covid"):
        assert file_hashes(root / source) == file_hashes(tmp_path / source)
    assert (root / MANIFEST_NAME).read_bytes() == (tmp_path / MANIFEST_NAME).read_bytes()
    other = tmp_path / "other"
    synthesize(tiny_config("data.synth.seed=4"), other / "nih", other / "covid", workers=1)
    first, second = file_hashes(root / "nih"), file_hashes(other / "nih")
    shared = set(first) & set(second)
    assert sum(first[k] != second[k] for k in shared) > 0.9 * len(shared)


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    cfg = tiny_config("data.synth.nih_patients=3", "data.synth.covid_images=4", "data.synth.corrupt_files=0")
    synthesize(cfg, tmp_path / "nih", tmp_path / "covid", workers=1)
    with pytest.raises(FileExistsError, match="nih"):
        synthesize(cfg, tmp_path / "nih", tmp_path / "covid", workers=1)
    (tmp_path / "nih" / "images_001" / "images" / "stale.png").write_bytes(b"old")
    synthesize(cfg, tmp_path / "nih", tmp_path / "covid", overwrite=True, workers=1)
    assert not (tmp_path / "nih" / "images_001" / "images" / "stale.png").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not write"):
        synthesize(cfg, foreign, tmp_path / "covid", overwrite=True, workers=1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_writes_and_prints_a_summary(tmp_path, capsys):
    args = ["--config", str(ROOT / "ray_config.yaml"), "--profile", "demo", "--workers", "1"]
    args += [f"--set={s}" for s in TINY] + ["--nih", str(tmp_path / "n"), "--covid", str(tmp_path / "c")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Infiltration" in out and "Viral Pneumonia" in out and "done in" in out
    assert (tmp_path / "n" / layouts.NIH_CSV_NAME).is_file() and (tmp_path / MANIFEST_NAME).is_file()
    assert main(args) == 2  # refuses to overwrite without --overwrite


# ------------------------------------------------------------------------------- labels and pictures


def test_label_mix_is_imbalanced_with_a_floor_and_every_finding_in_test():
    images = plan_nih(SynthConfig(nih_patients=700, max_images_per_patient=3))
    n = len(images)
    share = {name: sum(name in img.findings for img in images) / n for name in NIH14}
    assert 0.45 <= sum(not img.findings for img in images) / n <= 0.58
    assert set(sorted(share, key=share.get)[-3:]) == {"Infiltration", "Effusion", "Atelectasis"}
    assert min(share.values()) >= 0.018
    assert share["Hernia"] <= sorted(share.values())[3]
    for name in NIH14:
        test_patients = {img.patient for img in images if img.test and name in img.findings}
        assert len(test_patients) >= 2, name
    together = Counter(frozenset(img.findings) for img in images if len(img.findings) > 1)
    assert together, "findings should co-occur"


def test_follow_ups_mostly_keep_the_patients_findings():
    images = make_plan(SynthConfig(nih_patients=300, max_images_per_patient=4)).nih
    pairs = [(a, b) for a, b in zip(images, images[1:], strict=False) if a.patient == b.patient]
    same = sum(a.findings == b.findings for a, b in pairs)
    assert pairs and 0.6 < same / len(pairs) < 0.98


@pytest.mark.parametrize("finding", sorted(PAINTERS))
def test_every_sign_is_visible_at_64_px(finding):
    source = "covid" if finding in COVID_CLASSES else "nih"
    normal = render_image(0, source, 5, 5, () if source == "nih" else ("Normal",), 128)
    sick = render_image(0, source, 5, 5, (finding,), 128)

    def small(pixels):
        return np.asarray(Image.fromarray(pixels).resize((64, 64), Image.Resampling.BOX))

    diff = np.abs(small(sick) - small(normal))
    if finding == "Normal":
        assert diff.max() == 0
    else:
        assert diff.max() > 0.15 and (diff > 0.05).sum() >= 8, (finding, diff.max(), (diff > 0.05).sum())
