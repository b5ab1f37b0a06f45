"""Shared fixtures for every tier: the real samples, one local Ray per test session, and the tiny data and
checkpoints several modules need (made once per session). Plain helpers live in tests/helpers.py.

Tiers (by folder): ``unit/`` never starts Ray; ``ray/`` uses the one session Ray (marker ``ray``); ``e2e/`` is
Serve over HTTP, the browser page and the local multi-node cluster. A test that asks for ``ray_session`` is
marked ``ray`` here if its module forgot, and one under ``unit/`` that does is a collection error. Tests marked
``gpu`` skip without a CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REAL_SAMPLES, ROOT, folder_state, tiny_checkpoint, write_layouts

UNIT_DIR = Path(__file__).parent / "unit"
RAY_FIXTURES = {"ray_session", "tiny_shards"}


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device (marker gpu)"))
    for item in items:
        uses_ray = bool(RAY_FIXTURES & set(getattr(item, "fixturenames", ())))
        if Path(str(item.fspath)).is_relative_to(UNIT_DIR) and (uses_ray or item.get_closest_marker("ray")):
            raise pytest.UsageError(f"{item.nodeid}: unit tests never start Ray; move it to tests/ray or tests/e2e")
        if uses_ray and not item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def real_samples() -> Path:
    if not (REAL_SAMPLES / "nih" / "images").is_dir():
        pytest.skip(f"real samples not found at {REAL_SAMPLES}")
    return REAL_SAMPLES


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) shared by every test marked `ray`. The dashboard runs (on loopback) because Ray
    Train's placement-group cleaner asks its state API whether a controller is alive: without it, the workers'
    CPUs of a sweep trial that Tune stops early are never given back."""
    import ray

    from pipelines.runtime import keep_ray_on_loopback

    ray.init(
        address="local",  # a Ray of the session's own, never one that another process left running on the machine
        _node_ip_address=keep_ray_on_loopback(),  # every port on 127.0.0.1, as the stages' own Ray
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level="ERROR",
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": "pipelines.runtime.prepare_worker"},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, ray_session) -> Path:
    """Hand-written layouts (24 NIH patients, 8 images per COVID class, 4 patients per Kermany class and split)
    ingested once at 32 px, 16 rows a shard: ``<root>/shards`` (returned), beside the source folders ``<root>/nih``,
    ``<root>/covid`` and ``<root>/pneumonia``. Read-only for the tests; asked for before a module deploys a Serve
    app, whose replicas leave Ray no whole CPU."""
    from pipelines.config import load_config
    from pipelines.data.ingest import ingest

    root = tmp_path_factory.mktemp("tiny-data")
    write_layouts(root, patients=24, covid_per_class=8)
    cfg = load_config(None, sets=["data.storage_size=32", "model.input_size=32", "data.rows_per_shard=16"])
    ingest(cfg, {source: root / source for source in ("nih", "covid", "pneumonia")}, root / "shards")
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Untrained ``test_efficientnet`` (cnn) and ``test_vit`` (vit) checkpoints at 64 px, seeded; read-only."""
    import torch

    folder = tmp_path_factory.mktemp("tiny-checkpoints")
    torch.manual_seed(0)
    return {
        "cnn": tiny_checkpoint(folder, "cnn", "test_efficientnet"),
        "vit": tiny_checkpoint(folder, "vit", "test_vit"),
    }


@pytest.fixture
def benchmarks_untouched():
    """Fails the test if anything under benchmarks/ (RESULTS.md above all) was written, added or removed."""
    folder = ROOT / "benchmarks"
    before = folder_state(folder)
    yield folder
    assert folder_state(folder) == before, "the benchmark wrote into benchmarks/"


@pytest.fixture
def handmade_predictions():
    """Hand-made (cnn, vit) predictions for the ensemble objective and sweep, 40 NIH and 40 COVID images, in the
    format of ``pipelines.train.steps.predict`` for a two-head model (``tests.helpers.SPACES[:2]``).

    40% of each dataset is 'hard': the CNN is unsure (confidence 0.5 on nih14, 0.55 on covid) and wrong on covid;
    elsewhere it is confident (>= 0.97) and right. The ViT is right everywhere with confidence 0.85-0.9.

    So a threshold in (0.55, 0.97] sends exactly the hard 40% to the ViT, and any w_cnn < 0.743 then fixes
    every covid answer (0.25 w + 0.9 (1 - w) > 0.55 w + 0.033 (1 - w)); nih14 AUROC is 1 for any w < 1.
    """
    import numpy as np

    n_nih, n_covid = 40, 40
    rng = np.random.default_rng(0)
    nih_labels = (rng.random((n_nih, 14)) < 0.5).astype(np.float32)
    nih_labels[0], nih_labels[1] = 1.0, 0.0  # every finding has positives and negatives
    covid_label = np.arange(n_covid) % 4
    hard_nih = np.arange(n_nih) % 5 < 2
    hard_covid = np.arange(n_covid) % 5 < 2
    source = np.r_[np.zeros(n_nih, np.int8), np.ones(n_covid, np.int8)]  # heads: SPACES[:2] (nih14, covid)
    labels_all = np.r_[nih_labels, np.zeros((n_covid, 14), np.float32)]
    covid_all = np.r_[np.full(n_nih, -1, np.int64), covid_label]

    cnn_nih = np.where(hard_nih[:, None], 0.5, np.where(nih_labels > 0, 0.98, 0.02))
    vit_nih = np.where(nih_labels > 0, 0.85, 0.15)
    onehot = np.eye(4)[covid_label]
    wrong = np.eye(4)[(covid_label + 1) % 4]
    cnn_covid = np.where(hard_covid[:, None], 0.55 * wrong + 0.25 * onehot + 0.1 * (1 - wrong - onehot), 0.97 * onehot)
    cnn_covid = np.where(hard_covid[:, None], cnn_covid, cnn_covid + 0.01 * (1 - onehot))
    vit_covid = 0.9 * onehot + (0.1 / 3) * (1 - onehot)

    def pack(nih_probs, covid_probs):
        return {
            "source": source,
            "label_nih14": labels_all,
            "label_covid": covid_all,
            "nih14": np.r_[nih_probs, np.full((n_covid, 14), 0.5)].astype(np.float32),
            "covid": np.r_[np.full((n_nih, 4), 0.25), covid_probs].astype(np.float32),
        }

    return pack(cnn_nih, cnn_covid), pack(vit_nih, vit_covid)
