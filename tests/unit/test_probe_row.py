"""The linear-probe row: its own training pointer (``latest-<role>-probe.json``), its label from the checkpoint's
recipe, and its row, columns and plot panel in report.md built from hand-made predictions."""

from __future__ import annotations

import pytest

from models.ensemble import adaptive, fuse
from pipelines.artifacts import latest_probes, training_key, training_pointer, write_latest_training
from pipelines.config import load_config
from pipelines.evaluate.evaluation import extra_label, full_metrics
from pipelines.evaluate.metrics import scored_heads
from pipelines.evaluate.report import write_report

CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
PROBE = "cnn linear probe"


def test_only_the_linear_probe_gets_its_own_pointer(tmp_path):
    assert [training_key("cnn", r) for r in ("full", "two_phase", "linear_probe")] == ["cnn", "cnn", "cnn-probe"]
    cfg = load_config(None, sets=[f"train.run_dir={tmp_path}"])
    assert latest_probes(cfg) == []  # no probe trained: no extra row, no error
    write_latest_training(cfg, "cnn", {"best_checkpoint": str(tmp_path / "full")})
    write_latest_training(cfg, "cnn-probe", {"best_checkpoint": str(tmp_path / "probe")})
    assert training_pointer(cfg, "cnn-probe").name == "latest-cnn-probe.json"
    assert latest_probes(cfg) == [tmp_path / "probe"]


@pytest.mark.parametrize(
    ("config", "label"),
    [
        ({"train": {"recipe": "linear_probe"}}, PROBE),
        ({"train": {"recipe": "two_phase"}}, "vit two phase"),
        ({}, "cnn full"),
    ],
)
def test_extra_rows_are_labelled_by_role_and_recipe(config, label):
    role = label.split()[0]
    assert extra_label({"role": role, "config": config}) == label


def _probe_of(cnn: dict) -> dict:
    """The CNN's ranking with every probability pulled halfway to uninformative: same AUROC, other calibration."""
    return {**cnn, "nih14": 0.5 * cnn["nih14"] + 0.25, "covid": 0.5 * cnn["covid"] + 0.125}


def test_report_has_the_probe_row_in_every_table(handmade_predictions, tmp_path):
    cnn, vit = handmade_predictions
    heads = ("nih14", "covid")
    gated, used_vit = adaptive({h: cnn[h] for h in heads}, {h: vit[h] for h in heads}, 0.4, 0.85, scored_heads(cnn))
    systems = {
        "cnn": cnn,
        "vit": vit,
        PROBE: _probe_of(cnn),
        "ensemble": {**cnn, **fuse(cnn, vit, 0.4)},
        "adaptive": {**cnn, **gated},
    }
    metrics = {name: full_metrics(pred, CLASSES) for name, pred in systems.items()}
    metrics["adaptive"]["vit_fraction"] = float(used_vit.mean())
    summary = {
        "ensemble": {"w_cnn": 0.4, "threshold": 0.85, "source": "config"},
        "tta_passes": 0,
        "test_images": len(cnn["source"]),
        "systems": metrics,
        "extras": {PROBE: {"checkpoint": "/ckpt/probe", "role": "cnn", "recipe": "linear_probe"}},
    }
    report = write_report(tmp_path, summary, systems, CLASSES).read_text()

    headline = next(line for line in report.splitlines() if line.startswith(f"| {PROBE} |"))
    cells = [c.strip() for c in headline.strip("|").split("|")]
    assert len(cells) == 7 and all(c != "n/a" for c in cells[1:])
    probe_ece, cnn_ece = (f"{metrics[name]['calibration']['covid']['ece']:.3f}" for name in (PROBE, "cnn"))
    assert cells[5] == probe_ece != cnn_ece  # the row holds the probe's own figures
    for section in ("| finding | ", "| class | "):  # per-finding AUROC and covid per-class tables
        header = next(line for line in report.splitlines() if line.startswith(section))
        assert header.split(" | ")[3] == PROBE  # after cnn and vit, before the ensembles
    assert "**cnn linear probe**: the CNN's linear heads trained on a frozen backbone" in report
    assert "`/ckpt/probe`" in report
    for plot in ("roc_nih14.png", "reliability_covid.png", "confusion_covid.png"):
        assert (tmp_path / plot).is_file()
