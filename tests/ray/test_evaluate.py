"""`cxr evaluate` end to end on the session's tiny shards and checkpoints: metrics, report, plots, Grad-CAM grid."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipelines.evaluate.evaluation import main

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
    labels = summary["explanations"]["labels"]
    assert {"covid:COVID", "covid:Normal"} <= set(labels) and any(label.startswith("nih14:") for label in labels)
    grid = Image.open(out / "gradcam_grid.png")
    assert grid.format == "PNG" and grid.height > 200 * len(labels) // 2  # one row per label
    report = (out / "report.md").read_text()
    assert "## Where the models look (Grad-CAM)" in report and "![gradcam_grid.png](gradcam_grid.png)" in report
    for plot in ("roc_nih14.png", "reliability_covid.png", "confusion_covid.png"):
        assert (out / plot).is_file()
    assert "sent" in capsys.readouterr().out  # the gate's ViT share is printed
