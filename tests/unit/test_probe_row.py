"""The linear-probe row: its own training pointer (``latest-<role>-probe.json``), its label from the checkpoint's
recipe, and its row, columns and plot panel in every head's section of report.md, built from hand-made predictions;
the pneumonia head's figures in the report and the console table."""

from __future__ import annotations

import numpy as np
import pytest

from models.ensemble import fuse
from models.labels import label_key
from pipelines.artifacts import latest_probes, training_key, training_pointer, write_latest_training
from pipelines.config import load_config
from pipelines.evaluate.evaluation import extra_label, format_console, full_metrics, gated
from pipelines.evaluate.report import write_report
from tests.helpers import SPACES

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


def _probe_of(cnn: dict, spaces: tuple) -> dict:
    """The CNN's ranking with every probability pulled halfway to uninformative: same AUROC, other calibration."""
    pulled = {s.head: 0.5 * cnn[s.head] + (0.25 if s.multi_label else 0.5 / len(s.classes)) for s in spaces}
    return {**cnn, **pulled}


def _summary(cnn: dict, vit: dict, spaces: tuple) -> tuple[dict, dict]:
    """The systems and the summary ``evaluate`` builds, from hand-made predictions."""
    adaptive_pred, used_vit = gated(cnn, vit, spaces, 0.4, 0.85)
    heads = [s.head for s in spaces]
    systems = {
        "cnn": cnn,
        "vit": vit,
        PROBE: _probe_of(cnn, spaces),
        "ensemble": {**cnn, **fuse({h: cnn[h] for h in heads}, {h: vit[h] for h in heads}, 0.4)},
        "adaptive": adaptive_pred,
    }
    metrics = {name: full_metrics(pred, spaces) for name, pred in systems.items()}
    metrics["adaptive"]["vit_fraction"] = float(used_vit.mean())
    summary = {
        "ensemble": {"w_cnn": 0.4, "threshold": 0.85, "source": "config"},
        "tta_passes": 0,
        "test_images": len(cnn["source"]),
        "label_spaces": [s.to_dict() for s in spaces],
        "test_images_per_head": {s.head: int((cnn["source"] == i).sum()) for i, s in enumerate(spaces)},
        "systems": metrics,
        "extras": {PROBE: {"checkpoint": "/ckpt/probe", "role": "cnn", "recipe": "linear_probe"}},
    }
    return systems, summary


def _row(lines: list[str], start: int, label: str) -> list[str]:
    """The cells of the first table row for ``label`` after line ``start``."""
    line = next(line for line in lines[start:] if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_has_a_section_per_head_with_the_probe_row_in_every_table(handmade_predictions, tmp_path):
    cnn, vit = handmade_predictions
    spaces = tuple(space for space in SPACES if space.head in cnn)
    systems, summary = _summary(cnn, vit, spaces)
    metrics = summary["systems"]
    report = write_report(tmp_path, summary, systems, spaces).read_text()
    lines = report.splitlines()

    summary_row = _row(lines, lines.index("## Summary"), PROBE)
    assert len(summary_row) == 2 + len(spaces) and all(c != "n/a" for c in summary_row[1:])
    for space in spaces:
        start = lines.index(f"## Head `{space.head}`")
        header = next(line for line in lines[start:] if line.startswith("| system |"))
        columns = [c.strip() for c in header.strip("|").split("|")]
        cells = _row(lines, start, PROBE)
        assert len(cells) == len(columns) and all(c != "n/a" for c in cells[1:])
        ece = f"{metrics[PROBE]['calibration'][space.head]['ece']:.3f}"
        assert cells[columns.index("ECE")] == ece != f"{metrics['cnn']['calibration'][space.head]['ece']:.3f}"
        if space.binary is not None:
            assert f"{space.binary} (binary) AUROC" in columns
        per_class = next(line for line in lines[start:] if line.startswith("| class | "))
        assert per_class.split(" | ")[3] == PROBE  # after cnn and vit, before the ensembles
        plots = [f"roc_{space.head}.png", f"reliability_{space.head}.png"]
        plots += [] if space.multi_label else [f"confusion_{space.head}.png"]
        for plot in plots:
            assert (tmp_path / plot).is_file() and f"![{plot}]({plot})" in report
    assert "**cnn linear probe**: the CNN's linear heads trained on a frozen backbone" in report
    assert "`/ckpt/probe`" in report


def _with_pneumonia(pred: dict, right: float, n: int = 30) -> dict:
    """``pred`` (the heads before pneumonia in ``SPACES``) with ``n`` pneumonia images appended: labels cycle through
    normal, bacterial, viral; the model gives the true class ``right`` and shares the rest, so it is always right
    and the figures are defined (every class and both binary answers present)."""
    index = [s.head for s in SPACES].index("pneumonia")
    assert [s.head for s in SPACES[:index]] == [h for h in pred if h in {s.head for s in SPACES}]
    total = len(pred["source"])
    label = np.arange(n) % 3
    probs = right * np.eye(3)[label] + (1 - right) / 2 * (1 - np.eye(3)[label])
    grown = {"source": np.r_[pred["source"], np.full(n, index, pred["source"].dtype)]}
    for space in SPACES[:index]:
        head, key = space.head, label_key(space.head)
        grown[head] = np.r_[pred[head], np.full((n, pred[head].shape[1]), 0.5, pred[head].dtype)]
        fill = np.zeros((n, pred[key].shape[1])) if space.multi_label else np.full(n, -1)
        grown[key] = np.r_[pred[key], fill.astype(pred[key].dtype)]
    grown["pneumonia"] = np.r_[np.full((total, 3), 1 / 3), probs].astype(np.float32)
    grown["label_pneumonia"] = np.r_[np.full(total, -1), label]
    return grown


def test_report_and_console_of_three_heads_show_the_pneumonia_figures(handmade_predictions, tmp_path):
    cnn, vit = handmade_predictions
    if "pneumonia" not in cnn:
        cnn, vit = _with_pneumonia(cnn, 0.6), _with_pneumonia(vit, 0.9)
    systems, summary = _summary(cnn, vit, SPACES)
    report = write_report(tmp_path, summary, systems, SPACES).read_text()
    lines = report.splitlines()
    start = lines.index("## Head `pneumonia`")
    header = next(line for line in lines[start:] if line.startswith("| system |"))
    assert header == "| system | accuracy | macro F1 | macro AUROC | pneumonia (binary) AUROC | ECE |"
    pneumonia = summary["systems"]["cnn"]["headline"]
    cells = _row(lines, start, "cnn")
    keys = ("pneumonia_accuracy", "pneumonia_macro_f1", "pneumonia_macro_auroc", "pneumonia_binary_auroc")
    assert cells[1:5] == [f"{pneumonia[key]:.3f}" for key in keys]
    nih = lines.index("## Head `nih14`")
    assert "abnormal (binary) AUROC" in next(line for line in lines[nih:] if line.startswith("| system |"))
    console = format_console(summary)
    count = summary["test_images_per_head"]["pneumonia"]
    assert f"head pneumonia ({count} test images)" in console and "pneumonia (binary) AUROC" in console
    assert PROBE in console
