"""The data path's scale features on a real local Ray: raw storage ingests the same pixels as PNG, the cached
validation split holds every row, and `cxr bench scale` runs end to end at a tiny size and writes nothing into
benchmarks/."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.data.imaging import decode_stored
from pipelines.data.ingest import ingest
from pipelines.train.driver import validation_split
from tests.helpers import ROOT, write_layouts

pytestmark = pytest.mark.ray


def _pixels_by_file(shards):
    rows = [row for path in sorted(shards.glob("*/*.parquet")) for row in pq.read_table(path).to_pylist()]
    return {(r["source"], r["relpath"]): decode_stored(r["image"]) for r in rows}


def test_raw_storage_ingests_the_same_pixels_and_splits_as_png(tmp_path, ray_session):
    write_layouts(tmp_path, patients=8, covid_per_class=3)
    sets = ["data.storage_size=32", "data.rows_per_shard=16"]
    found = {}
    for storage_format in ("png", "raw"):
        cfg = load_config(None, sets=[*sets, f"data.storage_format={storage_format}"])
        roots = {source: tmp_path / source for source in ("nih", "covid", "pneumonia")}
        manifest = ingest(cfg, roots, tmp_path / storage_format)
        assert manifest["storage"]["format"] == storage_format
        assert set(manifest["phase_seconds"]) == {"listing", "decode", "split", "twins", "write"}
        assert not (tmp_path / storage_format / "_decoded").exists()
        found[storage_format] = (_pixels_by_file(tmp_path / storage_format), manifest["images"])
    (png, png_counts), (raw, raw_counts) = found["png"], found["raw"]
    assert png_counts == raw_counts and png.keys() == raw.keys()
    assert all((png[key] == raw[key]).all() for key in png)


def test_cached_validation_split_is_materialised_with_every_row(tiny_shards):
    sets = [f"data.shards_dir={tiny_shards}", "model.input_size=32"]
    plain = validation_split(load_config(None, sets=sets))
    cached = validation_split(load_config(None, sets=[*sets, "train.cache_val=true"]))
    assert type(cached).__name__ == "MaterializedDataset" and type(plain).__name__ != "MaterializedDataset"
    assert cached.count() == plain.count() > 0


@pytest.mark.slow
def test_bench_scale_runs_at_a_tiny_size(tmp_path, capsys, benchmarks_untouched, tiny_checkpoints):
    sets = [
        "data.synth.nih_patients=40", "data.synth.nih_images=100", "data.synth.nih_image_size=48",
        "data.synth.covid_image_size=48", "data.storage_size=32", "model.input_size=32", "data.rows_per_shard=32",
        "data.synth.covid_class_counts={COVID: 6, Lung_Opacity: 6, Normal: 6, Viral Pneumonia: 6}",
        # the scale profile's 5,856 pneumonia JPEGs would be most of the run: 8 small ones instead
        "data.synth.pneumonia_class_counts=null", "data.synth.pneumonia_images=8",
        "data.synth.pneumonia_image_size=[48, 64]",
    ]  # fmt: skip
    args = ["bench", "scale", "--config", str(ROOT / "ray_config.yaml"), "--profile", "scale", "--sizes", "full"]
    args += [f"--set=data.{k}_dir={tmp_path / k}" for k in ("nih", "covid", "pneumonia", "shards")]
    args += ["--model", "test_efficientnet", "--checkpoint", str(tiny_checkpoints["cnn"])]
    assert main([*args, *[f"--set={s}" for s in sets], "--set=train.batch_size=16"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isalpha()}
    # 100 NIH + 24 COVID + 8 pneumonia images, all three datasets in the synth and ingest rows
    assert rows["synth"][1] == rows["ingest"][1] == "132"
    assert "twins" in " ".join(rows["ingest"]) and "MiB" in rows["ingest"]
    assert int(rows["epoch"][1]) == int(rows["epoch+model"][1]) > 0  # the same train split, with and without a model
    assert int(rows["eval-local"][1]) == int(rows["eval-ray"][1]) > 0
