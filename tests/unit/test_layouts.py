"""Layout readers: labels and metadata from the CSV, rejects with reasons, partial downloads, clear errors."""

from __future__ import annotations

import pytest

from models.labels import COVID_CLASSES, LabelError, format_nih_labels, parse_nih_labels
from pipelines.data.layouts import DatasetLayoutError, list_covid, list_nih
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
    assert {r["covid_label"] for r in listing.rows} == {0, 1, 2, 3}


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
    assert sum(r["nih_labels"][13] for r in listing.rows) == 2  # Hernia, per SOURCES.md
