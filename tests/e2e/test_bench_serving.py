"""`cxr bench serve` and `cxr bench cache` at their smallest sizes: Serve over HTTP on the session's local Ray, the
session's tiny checkpoints (``serve.<role>.checkpoint``) and tiny shards' test images. Each prints its table, every
cell answered requests without errors where the table shows them, and nothing is written into benchmarks/."""

from __future__ import annotations

import os
import re

import pytest

from pipelines.cli import main
from tests.helpers import CONFIG, SMALL_SERVE_SETS, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _sets(shards, checkpoints, run_dir) -> list[str]:
    values = [
        f"data.shards_dir={shards}",
        "data.storage_size=32",
        f"train.run_dir={run_dir}",  # no ensemble.yaml there: the gate comes from the config
        f"serve.port={free_port()}",
        *SMALL_SERVE_SETS,  # these replace serve.cnn / serve.vit whole: the checkpoints come after them
        f"serve.cnn.checkpoint={checkpoints['cnn']}",
        f"serve.vit.checkpoint={checkpoints['vit']}",
    ]
    return ["--config", str(CONFIG), *(f"--set={value}" for value in values)]


def _rows(out: str) -> list[list[str]]:
    """The cells of each row of the Markdown tables printed, header and rule lines left out."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    return [row for row in rows if row[0] not in ("path", "cache") and not row[0].startswith("-")]


def test_bench_serve_prints_its_table_and_writes_nothing(
    tiny_shards, tiny_checkpoints, tmp_path, capsys, benchmarks_untouched
):
    argv = ["bench", "serve", "--clients", "2", "--seconds", "0.3", "--max-requests", "10", "--images", "4"]
    assert main(argv + _sets(tiny_shards, tiny_checkpoints, tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "| path | clients | requests | req/s | p50 ms | p95 ms | p99 ms | ViT share |" in out
    cells = {("direct cnn", "1"), ("direct ensemble", "1"), ("serve floor (no work)", "1")}
    cells |= {(f"serve {mode}", n) for mode in ("cnn", "ensemble", "adaptive", "adaptive, unbatched") for n in "12"}
    table = {(row[0], row[1]): row for row in _rows(out)}
    assert set(table) == cells, table
    assert all(int(row[2]) > 0 for row in table.values()), table  # every cell had answered requests
    assert "- adaptive / always-ensemble throughput:" in out and "- Serve p50 overhead over the direct call" in out
    assert "4 images from the synthetic test split" in out and "written to" not in out


def test_bench_cache_prints_its_table_and_writes_nothing(
    tiny_shards, tiny_checkpoints, tmp_path, capsys, benchmarks_untouched
):
    """One client, 4 distinct images, half the requests repeats: with the cache on, every repeat is a hit."""
    argv = ["bench", "cache", "--clients", "1", "--images", "6", "--repeat-fraction", "0.5", "--seconds", "30"]
    assert main(argv + _sets(tiny_shards, tiny_checkpoints, tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "mode adaptive, 1 clients, 8 requests over 4 images (repeats: 50% of requests), store lru" in out
    assert "| cache | requests | errors | req/s | p50 ms | p95 ms | hit rate |" in out
    table = {row[0]: row for row in _rows(out)}
    assert set(table) == {"off", "on"}, table
    assert table["off"][1:3] == ["8", "0"] and table["off"][6] == "0%"  # 8 requests, no error, no hit
    assert table["on"][1:3] == ["8", "0"] and table["on"][6] == "50%"
    assert re.search(r"speed-up with the cache: [\d.]+x", out)


def test_bench_serve_full_size_runs_every_cell_with_tiny_models(real_samples, tmp_path, capsys, benchmarks_untouched):
    """``--full-size --tiny``: the full-size benchmark's path (ONNX exports, direct cells on 1 and N threads, the gate
    set to a ViT share, batched and unbatched at 16 clients) with timm's test models, on real NIH PNGs."""
    argv = ["bench", "serve", "--full-size", "--tiny", "--clients", "2", "--seconds", "1", "--max-requests", "8"]
    argv += ["--images", "4", "--images-dir", str(real_samples / "nih" / "images"), "--vit-share", "0.5"]
    sets = [f"train.run_dir={tmp_path / 'run'}", f"serve.port={free_port()}", *SMALL_SERVE_SETS]
    assert main(argv + ["--config", str(CONFIG), *(f"--set={value}" for value in sets)]) == 0
    out = capsys.readouterr().out
    table = {(row[0], row[1]): row for row in _rows(out)}
    threads = str(len(os.sched_getaffinity(0)))
    cells = {(f"direct {mode}", n) for mode in ("cnn", "ensemble") for n in {"1", threads}}
    cells |= {(f"serve {mode}", n) for mode in ("cnn", "ensemble") for n in "12"}
    cells |= {("serve adaptive", n) for n in ("1", "2", "16")} | {("serve adaptive, unbatched", "16")}
    assert set(table) == cells, table
    assert all(int(row[2]) > 0 for row in table.values()), table
    assert table[("serve adaptive", "2")][7] == "50%"  # 2 of the 4 images go to the ViT, as asked
    assert "CNN ONNX Runtime fp32, ViT ONNX Runtime int8 (dynamic)" in out
    for check in ("- CNN-only at 2 clients:", "- always-ensemble at 2 clients:", "- adaptive / always-ensemble at 2"):
        assert check in out
    assert "written to" not in out
