"""`cxr bench data` and `cxr bench train` at their smallest sizes on the session's tiny shards and local Ray: each
prints its table and writes nothing into benchmarks/."""

from __future__ import annotations

import re

import pytest

from pipelines.cli import main
from tests.helpers import CONFIG

pytestmark = pytest.mark.ray


def _sets(shards) -> list[str]:
    values = [f"data.shards_dir={shards}", "data.storage_size=32", "model.input_size=32", "train.batch_size=8"]
    return [f"--set={value}" for value in values]


def test_bench_data_prints_its_table_and_writes_nothing(tiny_shards, capsys, benchmarks_untouched):
    argv = ["bench", "data", "--passes", "1", "--min-images", "32", "--naive", "--config", str(CONFIG)]
    assert main(argv + _sets(tiny_shards)) == 0
    out = capsys.readouterr().out
    assert re.search(r"stored 32 px\) -> train transform at 32 px, batch 8, 2 CPUs", out), out
    assert re.search(r"pipeline\s+images\s+seconds\s+images/s\s+vs \(a\)\s+1st batch", out), out
    for name in ("single process", "ray data, defaults", "ray data"):
        row = re.search(rf"^{re.escape(name)}\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)x", out, re.MULTILINE)
        assert row and int(row[1]) >= 32, (name, out)  # one timed pass reads at least --min-images
    assert re.search(r"^single process\s+\d+\s+[\d.]+\s+\d+\s+1.00x", out, re.MULTILINE)


@pytest.mark.slow
def test_bench_train_prints_its_table_and_writes_nothing(tiny_shards, capsys, benchmarks_untouched):
    argv = ["bench", "train", "--models", "cnn", "--epochs", "2", "--profile", "demo", "--config", str(CONFIG)]
    assert main(argv + _sets(tiny_shards)) == 0
    out = capsys.readouterr().out
    assert "input 32 px, batch 8/worker, 2 epochs per configuration (first excluded)" in out
    assert re.search(r"model\s+1 worker img/s\s+2 workers img/s/worker\s+2 workers total\s+scaling", out), out
    row = re.search(r"^cnn test_efficientnet\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)x$", out, re.MULTILINE)
    assert row and int(row[1]) > 0 and int(row[2]) > 0, out


def test_bench_ood_compares_the_two_checks_on_every_set(tiny_shards, tiny_checkpoints, capsys, benchmarks_untouched):
    argv = ["bench", "ood", "--cnn", str(tiny_checkpoints["cnn"]), "--config", str(CONFIG)]
    sets = [f"--set={value}" for value in ("ood.negatives_per_kind=3", "ood.components=8")]
    assert main(argv + _sets(tiny_shards) + sets) == 0
    out = capsys.readouterr().out
    assert re.search(r"^refused\s+layout\s+cnn features\s+images$", out, re.MULTILINE), out
    assert re.search(r"^test split\s+[\d.]+%\s+[\d.]+%\s+\d+$", out, re.MULTILINE), out
    # the layout check (serving's) refuses every generated non-radiograph even fitted on the tiny shards
    for kind in ("noise", "document", "blank", "hand"):
        assert re.search(rf"^negative: {kind}\s+100.0%\s+[\d.]+%\s+3$", out, re.MULTILINE), (kind, out)
    assert re.search(r"^ms an image\s+[\d.]+\s+[\d.]+$", out, re.MULTILINE), out
