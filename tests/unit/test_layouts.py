"""Layout readers and the registry: labels and metadata from the CSV, rejects with reasons, partial downloads, clear
errors; every dataset module declares one dataset, found by scanning the package."""

from __future__ import annotations

import pytest

from models.labels import LabelError
from pipelines.data.datasets import DATASETS, DatasetLayoutError, default_label_spaces
from pipelines.data.datasets.covid import COVID_CLASSES, list_covid
from pipelines.data.datasets.nih import format_nih_labels, list_nih, parse_nih_labels
from tests.helpers import write_layouts


def test_label_parsing_round_trip():
    assert parse_nih_labels("No Finding") == [0] * 14
    vector = parse_nih_labels("Effusion|Mass")
    assert vector[2] == vector[4] == 1 and sum(vector) == 2
    assert format_nih_labels(vector) == "Effusion|Mass"
    with pytest.raises(LabelError, match="Bogus"):
        parse_nih_labels("Effusion|Bogus")


def test_nih_listing_accounts_for_every_file(tmp_path):
    planted = write_layouts(tmp_path)
    listing = list_nih(tmp_path / "nih")
    reasons = {r["relpath"].split("/")[-1]: r["reason"] for r in listing.rejects}
    assert reasons == {planted["bad_label"]: "bad_label", planted["not_in_csv"]: "not_in_csv"}
    assert len(listing.rows) + len(listing.rejects) == planted["nih_images"]
    assert listing.missing_images == 1  # the CSV row whose image is not on disk
    row = next(r for r in listing.rows if r["relpath"].endswith("00000004_000.png"))
    assert row["patient_id"] == "nih-00000004" and row["official_split"] == "test"
    assert (row["view_position"], row["age"], row["sex"], row["original_width"]) == ("PA", 40, "F", 2500)


def test_covid_listing(tmp_path):
    planted = write_layouts(tmp_path)
    stray = tmp_path / "covid" / "COVID-19_Radiography_Dataset" / "Tuberculosis" / "images"
    stray.mkdir(parents=True)
    (stray / "Tuberculosis-1.png").write_bytes(b"x")
    listing = list_covid(tmp_path / "covid")
    assert listing.classes == COVID_CLASSES
    assert len(listing.rows) == planted["covid_images"]
    assert [r["reason"] for r in listing.rejects] == ["bad_label"]
    assert {r["labels"][0] for r in listing.rows} == {0, 1, 2, 3}


def test_three_class_release_has_its_own_label_space(tmp_path):
    write_layouts(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "covid" / "COVID-19_Radiography_Dataset" / "Lung_Opacity")
    listing = list_covid(tmp_path / "covid" / "COVID-19_Radiography_Dataset")
    assert listing.classes == ("COVID", "Normal", "Viral Pneumonia")


def test_errors_name_the_path_and_expectation(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"NIH root .*missing.* does not exist"):
        list_nih(tmp_path / "missing")
    (tmp_path / "nih").mkdir()
    with pytest.raises(DatasetLayoutError, match="no label CSV found"):
        list_nih(tmp_path / "nih")
    (tmp_path / "nih" / "Data_Entry_2017_v2020.csv").write_text("Image Index,Labels\nx.png,y\n")
    with pytest.raises(DatasetLayoutError, match=r"missing columns \['Finding Labels'"):
        list_nih(tmp_path / "nih")
    (tmp_path / "covid").mkdir()
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        list_covid(tmp_path / "covid")


def test_real_nih_partial_download(real_samples):
    """75 official-test images with the full 112,120-row CSV: what is there is listed, the rest counted."""
    listing = list_nih(real_samples / "nih")
    assert len(listing.rows) == 75 and not listing.rejects
    assert listing.missing_images == 112_120 - 75
    assert {r["official_split"] for r in listing.rows} == {"test"}
    assert sum(r["labels"][13] for r in listing.rows) == 2  # Hernia, per SOURCES.md


def test_registry_holds_every_dataset_module_in_rank_order():
    assert list(DATASETS) == ["nih", "covid", "pneumonia"]
    spaces = default_label_spaces()
    assert [s.head for s in spaces] == ["nih14", "covid", "pneumonia"]
    assert [s.multi_label for s in spaces] == [True, False, False]
    assert [s.binary for s in spaces] == ["abnormal", None, "pneumonia"]
    assert [d.required for d in DATASETS.values()] == [True, True, False]


def test_every_listing_row_has_the_same_keys(tmp_path):
    write_layouts(tmp_path)
    keys = set()
    for source, dataset in DATASETS.items():
        listing = dataset.list_files(tmp_path / source)
        assert listing.rows and listing.source == source
        keys |= {tuple(sorted(row)) for row in listing.rows}
        space = dataset.label_space
        width = len(space.classes) if space.multi_label else 1  # the 0/1 vector, or [class index]
        assert {len(row["labels"]) for row in listing.rows} == {width}
    assert len(keys) == 1
