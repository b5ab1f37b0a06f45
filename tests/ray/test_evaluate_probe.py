"""`cxr evaluate` picks up the last linear probe from ``latest-cnn-probe.json`` and reports it as one more row."""

from __future__ import annotations

import json

import pytest

from models.checkpoint import model_from_checkpoint, save_checkpoint
from pipelines.artifacts import write_latest_training
from pipelines.config import load_config
from pipelines.evaluate.evaluation import main

pytestmark = pytest.mark.ray


def test_evaluate_adds_the_probe_from_its_pointer(tiny_shards, tiny_checkpoints, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = {"data": {"storage_size": 64}, "model": {"input_size": 64}, "train": {"recipe": "linear_probe"}}
    probe = save_checkpoint(
        tmp_path / "probe",
        model_from_checkpoint(tiny_checkpoints["cnn"]),
        role="cnn",
        epoch=0,
        config=config,
        metrics={},
    )
    sets = [f"data.shards_dir={tiny_shards}", "data.storage_size=32", "model.input_size=64", f"train.run_dir={run_dir}"]
    write_latest_training(load_config(None, sets=sets), "cnn-probe", {"best_checkpoint": str(probe)})
    args = ["--cnn", str(tiny_checkpoints["cnn"]), "--vit", str(tiny_checkpoints["vit"]), "--explain-per-class", "0"]
    assert main(args + [arg for item in sets for arg in ("--set", item)]) == 0

    out = run_dir / "evaluation"
    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary["systems"]) == ["cnn", "vit", "cnn linear probe", "ensemble", "adaptive"]
    assert summary["extras"]["cnn linear probe"] == {"checkpoint": str(probe), "role": "cnn", "recipe": "linear_probe"}
    # the same weights as the CNN by the same prediction path: the same figures
    same = [json.dumps(summary["systems"][name]["headline"]) for name in ("cnn linear probe", "cnn")]
    assert same[0] == same[1]
    report = (out / "report.md").read_text()
    heads = [space["head"] for space in summary["label_spaces"]]
    assert report.count("| cnn linear probe |") >= 1 + 2 * len(heads)  # summary, each head's figures and classes
    assert capsys.readouterr().out.count("cnn linear probe") >= len(heads)  # a console table per head
