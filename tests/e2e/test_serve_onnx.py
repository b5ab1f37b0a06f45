"""`cxr export` on shards ingested by Ray Data, then the Serve app with ``serve.cnn.backend=onnx`` (the latest
export) over HTTP: it answers like the PyTorch checkpoint computed in process."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from PIL import Image
from ray import serve

from models.checkpoint import PreprocessSpec, model_from_checkpoint
from pipelines.config import load_config
from pipelines.export import export
from serve.app import build_app
from serve.preprocess import Preprocessor
from serve.replicas import probabilities
from tests.helpers import CONFIG, free_port, png, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_serve_cnn_on_onnx_answers_like_pytorch(ray_session, tiny_shards, tiny_checkpoints, tmp_path):
    """`cxr export` on ingested shards, then the app with serve.cnn.backend=onnx (the latest export)."""
    checkpoints = tiny_checkpoints
    port = free_port()
    sets = [
        f"data.shards_dir={tiny_shards}",
        f"export.out_dir={tmp_path / 'export'}",
        f"train.run_dir={tmp_path / 'run'}",
        "export.parity_batches=2",
        f"serve.port={port}",
        "serve.cache.enabled=false",
        "serve.router={num_cpus: 0.2}",
        "serve.cnn={backend: onnx, max_replicas: 1, num_cpus: 0.3, num_gpus: 0}",
        "serve.vit={max_replicas: 1, num_cpus: 0.3, num_gpus: 0}",
    ]
    cfg = load_config(CONFIG, sets=sets)
    summary = export(cfg, "cnn", checkpoints["cnn"])
    assert summary["parity"]["max_abs_logit_diff"] <= 1e-4
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg, checkpoints["cnn"], checkpoints["vit"]), name="cxr", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        info = requests.get(f"{url}/v1/model", timeout=10).json()["models"]
        assert info["cnn"]["backend"] == "onnx" and info["vit"]["backend"] == "torch"
        assert (info["cnn"]["onnx_model"], info["cnn"]["onnx_sha256"]) == (summary["path"], summary["sha256"])
        data = png(300, seed=7)
        body = requests.post(f"{url}/v1/predict", params={"mode": "cnn"}, data=data, timeout=60).json()
    finally:
        serve.shutdown()
    gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    model = model_from_checkpoint(checkpoints["cnn"])
    expected = probabilities(model, Preprocessor(PreprocessSpec(64, 64))(gray)[None], "cpu")
    assert body["heads"] == list(expected) == ["nih14", "covid", "pneumonia"]  # every head, rebuilt from the export
    for head, probs in expected.items():
        np.testing.assert_allclose(list(body[head]["probabilities"].values()), probs[0], atol=1e-4)
