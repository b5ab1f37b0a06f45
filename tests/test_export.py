"""ONNX export, int8 quantisation and the ONNX Runtime serving backend.

Unit tests (no Ray) on timm's tiny ``test_efficientnet`` / ``test_vit`` at 64 px: export, checker, parity with
PyTorch, metadata, dynamic batch, dynamic and static int8, the metadata check a replica runs, the ``cxr export``
stage on hand-written parquet shards (read with pyarrow, as the stage reads them). One ``ray`` + ``slow`` test runs
the stage on shards ingested by Ray Data and serves its export: ``serve.cnn.backend=onnx`` answers like PyTorch.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_serve_app import free_port, png, shards_config, tiny_checkpoint  # noqa: F401 (shards_config: a fixture)

from models.checkpoint import load_checkpoint, model_from_checkpoint
from models.labels import COVID_CLASSES, NIH14
from models.onnx_export import (
    OnnxMetadataError,
    agreement,
    build_metadata,
    export_onnx,
    logit_parity,
    onnx_logits,
    ort_session,
    quantize_int8,
    read_metadata,
)
from pipelines.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
ARCHS = {"cnn": "test_efficientnet", "vit": "test_vit"}


def batches(count: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (batch, 1, SIZE, SIZE), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """role -> (checkpoint dir, payload, fp32 ONNX path) for both tiny models."""
    folder = tmp_path_factory.mktemp("export")
    found = {}
    for role, arch in ARCHS.items():
        checkpoint = tiny_checkpoint(folder / "ckpt", role, arch)
        payload = load_checkpoint(checkpoint)
        path = export_onnx(model_from_checkpoint(checkpoint, payload), folder / role / "model.onnx",
                           build_metadata(payload, checkpoint, 64))  # fmt: skip
        found[role] = (checkpoint, payload, path)
    return found


# ------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("role", ARCHS)
def test_export_passes_the_checker_and_matches_pytorch(exports, role):
    import onnx

    checkpoint, payload, path = exports[role]
    onnx.checker.check_model(str(path), full_check=True)
    parity = logit_parity(model_from_checkpoint(checkpoint, payload), ort_session(path, 1), batches(2, 4))
    assert parity["images"] == 8
    assert parity["max_abs_logit_diff"] <= 1e-4, parity


@pytest.mark.parametrize("role", ARCHS)
def test_metadata_carries_preprocessing_and_label_spaces(exports, role):
    checkpoint, _, path = exports[role]
    meta = read_metadata(path)
    assert meta["arch"] == ARCHS[role] and meta["role"] == role
    assert (int(meta["input_size"]), int(meta["storage_size"])) == (64, 64)
    assert (float(meta["mean"]), float(meta["std"])) == (0.5, 0.25)
    assert json.loads(meta["label_spaces"]) == {"nih14": list(NIH14), "covid": list(COVID_CLASSES)}
    assert meta["source_checkpoint"] == str(checkpoint) and meta["quantize"] == "none"


@pytest.mark.parametrize("role", ARCHS)
@pytest.mark.parametrize("batch", [1, 5])
def test_batch_axis_is_dynamic(exports, role, batch):
    checkpoint, payload, path = exports[role]
    images = batches(1, batch, seed=batch)
    logits = onnx_logits(ort_session(path, 1), images[0])
    assert logits["nih14"].shape == (batch, 14) and logits["covid"].shape == (batch, len(COVID_CLASSES))
    parity = logit_parity(model_from_checkpoint(checkpoint, payload), ort_session(path, 1), images)
    assert parity["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("role", ARCHS)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_models_run_and_roughly_agree_with_fp32(exports, tmp_path, role, mode):
    _, _, path = exports[role]
    op_types = load_config(None).export.static_op_types[role] if mode == "static" else ["MatMul", "Gemm"]
    target = quantize_int8(path, tmp_path / f"int8-{mode}.onnx", mode, batches(4, 8, seed=9), op_types)
    assert read_metadata(target)["quantize"] == mode
    assert read_metadata(target)["arch"] == ARCHS[role]
    agreed = agreement(ort_session(path, 1), ort_session(target, 1), batches(2, 8, seed=3))
    assert agreed["images"] == 16
    assert agreed["mean_abs_prob_diff"] < 0.02 and agreed["max_abs_prob_diff"] < 0.15, agreed
    if mode == "static":
        assert target.stat().st_size < path.stat().st_size  # int8 weights


# ---------------------------------------------------------------------------------------- serving side


def test_runner_answers_like_the_torch_replica(exports):
    from serve.onnx_backend import OnnxRunner
    from serve.replicas import probabilities

    checkpoint, payload, path = exports["cnn"]
    runner = OnnxRunner(path, threads=1)
    runner.verify(payload, 64)
    images = batches(1, 3, seed=4)[0]
    expected = probabilities(model_from_checkpoint(checkpoint, payload), images, "cpu")
    found = runner(images)
    for head in ("nih14", "covid"):
        assert found[head].dtype == np.float32
        np.testing.assert_allclose(found[head], expected[head], atol=1e-5)
    assert runner.info()["backend"] == "onnx" and len(runner.info()["onnx_sha256"]) == 64


def test_mismatched_metadata_names_the_file_and_field(exports):
    from serve.onnx_backend import OnnxRunner

    _, vit_payload, _ = exports["vit"]
    _, cnn_payload, cnn_path = exports["cnn"]
    with pytest.raises(OnnxMetadataError, match=rf"{cnn_path}: metadata field 'arch' is 'test_efficientnet'"):
        OnnxRunner(cnn_path, 1).verify(vit_payload, 64)
    other_size = {**cnn_payload, "preprocessing": {**cnn_payload["preprocessing"], "input_size": 96}}
    with pytest.raises(OnnxMetadataError, match="'input_size' is '64' but the checkpoint has '96'"):
        OnnxRunner(cnn_path, 1).verify(other_size, 64)
    other_labels = {**cnn_payload, "label_spaces": {"nih14": list(NIH14), "covid": ["COVID", "Normal"]}}
    with pytest.raises(OnnxMetadataError, match="'label_spaces'"):
        OnnxRunner(cnn_path, 1).verify(other_labels, 64)


def test_a_replica_on_a_gpu_stays_on_pytorch(exports):
    import torch

    from serve.onnx_backend import backend_for_replica

    _, payload, path = exports["cnn"]
    source = {"role": "cnn", "backend": "onnx", "onnx_model": str(path)}
    runner, info = backend_for_replica(source, payload, 64, torch.device("cuda"), 1)
    assert runner is None and info["backend"] == "torch"
    runner, info = backend_for_replica(source, payload, 64, torch.device("cpu"), 1)
    assert runner is not None and info["backend"] == "onnx" and info["onnx_model"] == str(path)
    runner, info = backend_for_replica({**source, "backend": "torch"}, payload, 64, torch.device("cpu"), 1)
    assert runner is None and info == {"backend": "torch"}


def test_resolve_source_finds_the_latest_export_or_says_how_to_make_one(exports, tmp_path):
    from serve.model_source import ModelSourceError, resolve_source

    checkpoint, _, path = exports["cnn"]
    sets = [f"export.out_dir={tmp_path}", "serve.cnn.backend=onnx", f"train.run_dir={tmp_path / 'run'}"]
    cfg = load_config(None, sets=sets)
    with pytest.raises(ModelSourceError, match=r"latest-cnn.json not found: run `cxr export --model cnn"):
        resolve_source(cfg, "cnn", checkpoint)
    (tmp_path / "latest-cnn.json").write_text(json.dumps({"path": str(path), "sha256": "ab"}))
    source = resolve_source(cfg, "cnn", checkpoint)
    assert (source["backend"], source["onnx_model"]) == ("onnx", str(path))
    assert resolve_source(cfg, "vit", checkpoint)["backend"] == "torch"
    explicit = load_config(None, sets=[*sets, f"serve.cnn.onnx_model={tmp_path / 'missing.onnx'}"])
    with pytest.raises(ModelSourceError, match="serve.cnn.onnx_model .*missing.onnx not found"):
        resolve_source(explicit, "cnn", checkpoint)


# ------------------------------------------------------------------------------------ the cxr stage


def _png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root: Path, rows_per_split: int = 12) -> Path:
    """test/ and val/ parquet shards with the columns ingest writes that the stage reads; half NIH, half COVID."""
    for index, split in enumerate(("test", "val")):
        sources = ["nih" if i % 2 == 0 else "covid" for i in range(rows_per_split)]
        table = pa.table(
            {
                "image": pa.array([_png_bytes(100 * index + i) for i in range(rows_per_split)], pa.binary()),
                "source": sources,
                "nih_labels": pa.array(
                    [[i % 2, 0] * 7 if s == "nih" else None for i, s in enumerate(sources)], pa.list_(pa.int64())
                ),
                "covid_label": pa.array([i % 4 if s == "covid" else None for i, s in enumerate(sources)], pa.int64()),
            }
        )
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / split / "part-0.parquet")
    return root


def test_cxr_export_stage_writes_checks_logs_and_records(exports, tmp_path, capsys):
    from pipelines.cli import main

    checkpoint, _, _ = exports["cnn"]
    shards = write_shards(tmp_path / "shards")
    sets = [
        f"data.shards_dir={shards}",
        f"export.out_dir={tmp_path / 'export'}",
        f"train.run_dir={tmp_path / 'run'}",
        "model.input_size=224",  # the checkpoint's 64 px must win for the transform
        "export.batch_size=5",
        "export.parity_batches=2",
        "export.calibration_batches=2",
    ]
    argv = ["export", "--model", "cnn", "--format", "onnx", "--quantize", "static", "--checkpoint", str(checkpoint)]
    assert main(argv + ["--config", str(ROOT / "ray_config.yaml"), *(f"--set={s}" for s in sets)]) == 0
    printed = capsys.readouterr().out
    assert "max abs logit difference" in printed and "int8 (static)" in printed
    latest = json.loads((tmp_path / "export" / "latest-cnn.json").read_text())
    assert latest["quantize"] == "static" and latest["path"].endswith("model-int8-static.onnx")
    assert latest["parity"]["images"] == 10 and latest["parity"]["max_abs_logit_diff"] <= 1e-4
    assert latest["int8"]["calibration"] == {"split": "val", "images": 10}
    assert latest["int8"]["agreement_with_fp32"]["images"] == 10
    assert latest["source_checkpoint"] == str(checkpoint)
    from models.checkpoint import file_sha256

    assert latest["sha256"] == file_sha256(latest["path"])
    assert read_metadata(latest["path"])["quantize"] == "static"
    _assert_logged_to_mlflow(latest, tmp_path / "run")


def _assert_logged_to_mlflow(latest: dict, run_dir: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    assert latest["mlflow_tracking_uri"] == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(latest["mlflow_tracking_uri"])
    client = MlflowClient()
    names = {Path(a.path).name for a in client.list_artifacts(latest["mlflow_run_id"], "onnx")}
    assert {"model.onnx", "model-int8-static.onnx", "export.json"} <= names
    run = client.get_run(latest["mlflow_run_id"])
    assert run.data.metrics["onnx_parity_max_abs_logit_diff"] <= 1e-4


def test_cxr_export_refuses_a_checkpoint_of_the_other_role(exports, tmp_path, capsys):
    from pipelines.export import main

    checkpoint, _, _ = exports["vit"]
    sets = [f"--set=data.shards_dir={write_shards(tmp_path / 's')}", f"--set=export.out_dir={tmp_path}"]
    config = ["--config", str(ROOT / "ray_config.yaml")]
    assert main(["--model", "cnn", "--checkpoint", str(checkpoint), *config, *sets]) == 2
    assert "a vit checkpoint, not cnn" in capsys.readouterr().err


def test_cxr_export_fails_clearly_when_parity_is_out_of_tolerance(exports, tmp_path, capsys):
    from pipelines.export import main

    checkpoint, _, _ = exports["vit"]  # the tiny ViT's logits differ by ~1e-7, over this limit
    sets = [f"data.shards_dir={write_shards(tmp_path / 's')}", f"export.out_dir={tmp_path}", "export.parity_atol=1e-10"]
    argv = ["--model", "vit", "--checkpoint", str(checkpoint), "--config", str(ROOT / "ray_config.yaml")]
    assert main(argv + [f"--set={s}" for s in sets]) == 2
    err = capsys.readouterr().err
    assert "model.onnx: max abs logit difference to PyTorch" in err and "exceeds export.parity_atol 1e-10" in err
    assert not (tmp_path / "latest-vit.json").exists()


# -------------------------------------------------------------------------------------------- Serve


@pytest.mark.ray
@pytest.mark.slow
def test_serve_cnn_on_onnx_answers_like_pytorch(ray_session, shards_config, tmp_path):  # noqa: F811
    """`cxr export` on ingested shards, then the app with serve.cnn.backend=onnx (the latest export)."""
    import requests
    from ray import serve

    from models.checkpoint import PreprocessSpec
    from pipelines.export import export
    from serve.app import build_app
    from serve.preprocess import Preprocessor
    from serve.replicas import probabilities

    checkpoints = {role: tiny_checkpoint(tmp_path, role, arch) for role, arch in ARCHS.items()}
    port = free_port()
    sets = [
        f"data.shards_dir={shards_config.data.shards_dir}",
        f"export.out_dir={tmp_path / 'export'}",
        f"train.run_dir={tmp_path / 'run'}",
        "export.parity_batches=2",
        f"serve.port={port}",
        "serve.cache.enabled=false",
        "serve.router={num_cpus: 0.2}",
        "serve.cnn={backend: onnx, max_replicas: 1, num_cpus: 0.3, num_gpus: 0}",
        "serve.vit={max_replicas: 1, num_cpus: 0.3, num_gpus: 0}",
    ]
    cfg = load_config(ROOT / "ray_config.yaml", sets=sets)
    summary = export(cfg, "cnn", checkpoints["cnn"])
    assert summary["parity"]["max_abs_logit_diff"] <= 1e-4
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg, checkpoints["cnn"], checkpoints["vit"]), name="cxr", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while requests.get(f"{url}/v1/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "app never became ready"
            time.sleep(0.5)
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
    np.testing.assert_allclose(list(body["nih14"]["probabilities"].values()), expected["nih14"][0], atol=1e-4)
    np.testing.assert_allclose(list(body["covid"]["probabilities"].values()), expected["covid"][0], atol=1e-4)
