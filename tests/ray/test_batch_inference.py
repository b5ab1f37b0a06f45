"""Evaluation's two inference paths agree row for row: this process vs Ray Data batch inference (actor pool)."""

from __future__ import annotations

import numpy as np
import pytest

from models.checkpoint import label_spaces_of, load_checkpoint, model_from_checkpoint
from models.labels import label_key
from pipelines.config import load_config
from pipelines.data.shards import shard_files
from pipelines.evaluate.inference import predict_checkpoint, predict_local, predict_ray, use_ray

pytestmark = pytest.mark.ray


def test_ray_batch_inference_matches_the_local_path_row_for_row(tiny_shards, tiny_checkpoints):
    cfg = load_config(None, sets=[f"data.shards_dir={tiny_shards}", "evaluate.batch_size=8", "evaluate.actors=1"])
    files = shard_files(tiny_shards, "test")
    for role, checkpoint in tiny_checkpoints.items():
        local = predict_local(model_from_checkpoint(checkpoint), cfg, files)
        remote = predict_ray(cfg, checkpoint, files)
        spaces = label_spaces_of(load_checkpoint(checkpoint))
        assert set(remote) == set(local) and len(local["source"]) > 8  # more than one batch
        assert set(local) == {"source", *(s.head for s in spaces), *(label_key(s.head) for s in spaces)}
        for key in ("source", *(label_key(s.head) for s in spaces)):
            assert np.array_equal(remote[key], local[key]), (role, key)
        for space in spaces:
            head = space.head
            np.testing.assert_allclose(remote[head], local[head], atol=1e-5, err_msg=f"{role} {head}")


def test_auto_switches_to_ray_at_the_configured_row_count(tiny_shards, tiny_checkpoints):
    files = shard_files(tiny_shards, "test")
    base = [f"data.shards_dir={tiny_shards}"]
    assert not use_ray(load_config(None, sets=base), files)  # 100,000 rows by default
    assert use_ray(load_config(None, sets=[*base, "evaluate.ray_min_rows=1"]), files)
    assert not use_ray(load_config(None, sets=[*base, "evaluate.ray_min_rows=1", "evaluate.inference=local"]), files)
    cfg = load_config(None, sets=[*base, "evaluate.inference=ray", "evaluate.actors=1"])
    with_tta = predict_checkpoint(cfg, tiny_checkpoints["cnn"], files, tta=1)
    for space in label_spaces_of(load_checkpoint(tiny_checkpoints["cnn"])):  # every head averaged over the passes
        assert with_tta[space.head].shape == (len(with_tta["source"]), len(space.classes))
