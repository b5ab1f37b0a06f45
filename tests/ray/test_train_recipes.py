"""Training recipes on Ray Train: a two-phase run (2 DDP workers, gradient accumulation) on the session's tiny
shards. Its first phase is the linear probe: after it the backbone, BatchNorm statistics included, is the one it
started from while the heads moved; after the switch (a new DDP wrapper) the backbone trains. MLflow holds the
recipe and the phase switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from models.checkpoint import load_checkpoint
from pipelines.config import load_config
from pipelines.train.driver import train
from tests.helpers import CONFIG, tiny_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # about 90 s on 2 busy cores, mostly Ray Train start-up


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_phase_run_probes_then_fine_tunes(tiny_shards, tmp_path):
    """Epoch 0 trains the heads on the frozen backbone of a known starting point (``model.cnn.pretrained``), epoch 1
    the whole network."""
    # with the metadata fusion head, as the demo's CNN: its encoder trains with the heads, through DDP
    start = tiny_checkpoint(tmp_path / "start", "cnn", "test_efficientnet", 32, metadata=True) / "checkpoint.pt"
    sets = [
        f"data.shards_dir={tiny_shards}", f"train.run_dir={tmp_path / 'runs'}", "model.input_size=32",
        f"model.cnn.pretrained={start}", "train.batch_size=8", "train.epochs=2", "train.recipe=two_phase",
        "train.freeze_backbone_epochs=1", "train.backbone_lr_scale=0.5", "train.grad_accum_steps=2",
    ]  # fmt: skip
    summary = train(load_config(CONFIG, "demo", sets), "cnn", "two-phase")
    assert summary["epochs_run"] == 2
    payloads = sorted((load_checkpoint(p.parent) for p in Path(tmp_path, "runs", "two-phase").rglob("checkpoint.pt")),
                      key=lambda payload: payload["epoch"])  # fmt: skip
    assert [p["epoch"] for p in payloads] == [0, 1]
    initial, heads_only, whole = load_checkpoint(start.parent)["model"], payloads[0]["model"], payloads[1]["model"]
    assert any(k.endswith("running_mean") for k in _split(initial, "backbone."))
    assert _same(_split(initial, "backbone."), _split(heads_only, "backbone."))  # the probe: weights and BN stats
    assert not _same(_split(initial, "heads."), _split(heads_only, "heads."))
    assert not _same(_split(heads_only, "backbone."), _split(whole, "backbone."))  # unfrozen in epoch 1

    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["recipe"] == "two_phase" and run.data.tags["phase"] == "all"
    assert (run.data.tags["phase_heads_from_epoch"], run.data.tags["phase_all_from_epoch"]) == ("0", "1")
    assert history(client, run.info.run_id, "backbone_trainable") == [0.0, 1.0]
    lr, backbone_lr = (history(client, run.info.run_id, key) for key in ("lr", "lr_backbone"))
    assert lr[0] > 0 and backbone_lr == pytest.approx([0.5 * v for v in lr])
