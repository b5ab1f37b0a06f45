"""`cxr bench export` at its smallest size, without Ray: ``--tiny`` (timm's test models at 64 px in place of the
full-size ones), ``--no-serve``, the session's tiny checkpoints as the "demo" models and hand-written shards. It
prints its table with a row per model set, model and backend, and writes nothing into benchmarks/."""

from __future__ import annotations

import re

import pytest

from pipelines.cli import main
from tests.helpers import CONFIG, write_shards

BACKENDS = ("torch fp32", "ort fp32", "ort int8 dynamic", "ort int8 static")

pytestmark = pytest.mark.slow


def test_bench_export_prints_its_table_and_writes_nothing(tiny_checkpoints, tmp_path, capsys, benchmarks_untouched):
    shards = write_shards(tmp_path / "shards")
    sets = [
        f"data.shards_dir={shards}",
        f"train.run_dir={tmp_path / 'run'}",
        f"export.out_dir={tmp_path / 'export'}",
        "export.batch_size=4",
        "export.calibration_batches=1",
    ]
    argv = ["bench", "export", "--tiny", "--no-serve", "--seconds", "0.05", "--rounds", "1", "--config", str(CONFIG)]
    argv += ["--cnn", str(tiny_checkpoints["cnn"]), "--vit", str(tiny_checkpoints["vit"])]
    assert main(argv + [f"--set={s}" for s in sets]) == 0
    out = capsys.readouterr().out
    assert "| set | model | px | backend | file MB | img/s b1 | img/s b16 |" in out
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"\| (tiny|demo) \| ", line)]
    found = {(row[0].strip("| "), row[1], row[3]) for row in rows}
    expected = {(s, arch, b) for s in ("tiny", "demo") for arch in ("test_efficientnet", "test_vit") for b in BACKENDS}
    assert found == expected and len(rows) == len(expected)
    for row in rows:
        assert float(row[5]) > 0 and float(row[6]) > 0, row  # images/s at batch 1 and 16
        is_demo = row[0] == "| demo"
        assert ("n/a" in row[8]) != is_demo, row  # quality on the test split for the demo models only
        if is_demo:  # each head's main figure: macro AUROC (multi-label) or accuracy (multi-class)
            assert all(name in row[8] for name in ("nih14_macro_auroc", "covid_accuracy", "pneumonia_accuracy")), row
    assert "Serve, `?mode=cnn`" not in out and "Result cache" not in out  # --no-serve
    assert "written to" not in out
