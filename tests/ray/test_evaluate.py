"""`cxr evaluate` end to end on the session's tiny shards and checkpoints: metrics per head, report (a section per
head), plots, Grad-CAM grid."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipelines.evaluate.evaluation import main
from tests.helpers import SPACES, tiny_checkpoint

pytestmark = pytest.mark.ray


def test_evaluate_writes_the_report_with_a_gradcam_grid(tiny_shards, tiny_checkpoints, tmp_path, capsys):
    sets = ["data.storage_size=32", f"data.shards_dir={tiny_shards}"]
    cnn, vit = tiny_checkpoints["cnn"], tiny_checkpoints["vit"]
    args = ["--cnn", str(cnn), "--vit", str(vit), "--out", str(tmp_path / "report"), "--explain-per-class", "2"]
    sets += ["model.input_size=64", f"train.run_dir={tmp_path / 'run'}"]
    assert main(args + [arg for item in sets for arg in ("--set", item)]) == 0

    out = tmp_path / "report"
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["systems"]) == {"cnn", "vit", "ensemble", "adaptive"}
    heads = [space["head"] for space in summary["label_spaces"]]
    assert heads == [space.head for space in SPACES]  # the checkpoint's heads, in order
    present = [head for head in heads if summary["test_images_per_head"][head] > 0]
    assert {"nih14", "covid"} <= set(present)
    for system in summary["systems"].values():
        assert list(system["heads"]) == heads and list(system["calibration"]) == heads
        assert {f"{head}_macro_auroc" for head in heads} <= set(system["headline"])
        assert {"nih14_abnormal_auroc", "pneumonia_binary_auroc", "score"} <= set(system["headline"])
    labels = summary["explanations"]["labels"]
    assert {"covid:COVID", "covid:Normal"} <= set(labels)
    assert all(any(label.startswith(f"{head}:") for label in labels) for head in present)
    grid = Image.open(out / "gradcam_grid.png")
    assert grid.format == "PNG" and grid.height > 200 * len(labels) // 2  # one row per label
    report = (out / "report.md").read_text()
    assert "## Where the models look (Grad-CAM)" in report and "![gradcam_grid.png](gradcam_grid.png)" in report
    for head in heads:
        assert f"## Head `{head}`" in report
    for plot in ("roc_nih14.png", "reliability_nih14.png", "reliability_covid.png", "confusion_covid.png"):
        assert (out / plot).is_file()
    # the trust checks: no ensemble.yaml here, so no OOD check (said so); the shortcut check on the CNN's features
    assert summary["ood"] is None and "No check: the ensemble.yaml in use has none" in report
    shortcut = summary["shortcut"]
    assert shortcut["probe_all"]["rows"]["nih"] > 0 and isinstance(shortcut["flagged"], bool)
    assert "## Shortcut check" in report and shortcut["reading"] in report
    printed = capsys.readouterr().out
    assert "sent" in printed and all(f"head {head} (" in printed for head in heads)  # a console table per head


def test_a_fusion_model_is_reported_with_and_without_its_metadata(tiny_shards, tiny_checkpoints, tmp_path):
    cnn = tiny_checkpoint(tmp_path / "fusion", "cnn", "test_efficientnet", size=32, metadata=True)
    sets = ["data.storage_size=32", f"data.shards_dir={tiny_shards}", f"train.run_dir={tmp_path / 'run'}"]
    args = ["--cnn", str(cnn), "--vit", str(tiny_checkpoints["vit"]), "--out", str(tmp_path / "report")]
    assert main([*args, "--explain-per-class", "0", *[arg for item in sets for arg in ("--set", item)]]) == 0
    summary = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert summary["metadata_fusion"] == {"cnn": True, "vit": False}
    assert list(summary["systems"]) == ["cnn", "vit", "cnn without metadata", "ensemble", "adaptive"]
    with_meta = summary["systems"]["cnn"]["headline"]
    without = summary["systems"]["cnn without metadata"]["headline"]
    # the same rows: covid and pneumonia rows carry no metadata, so only the NIH head can move
    assert without["covid_accuracy"] == with_meta["covid_accuracy"]
    assert without["pneumonia_macro_f1"] == with_meta["pneumonia_macro_f1"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**cnn without metadata**" in report and "| cnn without metadata |" in report


def test_a_report_folder_holding_the_run_folder_is_refused(tiny_checkpoints, tmp_path, capsys):
    """MLflow's artifact store lives in the run folder and the report is copied into it: it would copy itself."""
    args = ["--cnn", str(tiny_checkpoints["cnn"]), "--vit", str(tiny_checkpoints["vit"]), "--out", str(tmp_path)]
    assert main([*args, "--set", f"train.run_dir={tmp_path / 'run'}"]) == 2
    assert "holds train.run_dir" in capsys.readouterr().err
