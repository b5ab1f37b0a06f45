"""ONNX export, int8 quantisation and the ONNX Runtime serving backend, without Ray.

On timm's tiny ``test_efficientnet`` / ``test_vit`` at 64 px (seeded weights): export, checker, parity with
PyTorch, metadata, dynamic batch, dynamic and static int8, the metadata check a replica runs, the ``cxr export``
stage on hand-written parquet shards (read with pyarrow, as the stage reads them). Serving an export over HTTP is
tests/e2e/test_serve_onnx.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import load_checkpoint, model_from_checkpoint
from models.onnx_export import (
    OnnxExportError,
    OnnxMetadataError,
    agreement,
    build_metadata,
    export_onnx,
    logit_parity,
    onnx_logits,
    ort_session,
    quantize_int8,
    read_metadata,
    write_metadata,
)
from pipelines.config import load_config
from tests.helpers import CONFIG, SPACES, tiny_checkpoint, write_shards

SIZE = 64
ARCHS = {"cnn": "test_efficientnet", "vit": "test_vit"}
WEIGHT_SEED = 0  # torch.manual_seed before each tiny model is built


def batches(count: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (batch, 1, SIZE, SIZE), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """role -> (checkpoint dir, payload, fp32 ONNX path) for both tiny models, their random weights seeded: the
    int8 agreement bounds below were measured over seeds, and this one gives the same figures on every run."""
    import torch

    folder = tmp_path_factory.mktemp("export")
    found = {}
    for role, arch in ARCHS.items():
        torch.manual_seed(WEIGHT_SEED)
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
    assert json.loads(meta["label_spaces"]) == [space.to_dict() for space in SPACES]
    assert meta["source_checkpoint"] == str(checkpoint) and meta["quantize"] == "none"


@pytest.mark.parametrize("role", ARCHS)
@pytest.mark.parametrize("batch", [1, 5])
def test_batch_axis_is_dynamic(exports, role, batch):
    checkpoint, payload, path = exports[role]
    images = batches(1, batch, seed=batch)
    logits = onnx_logits(ort_session(path, 1), images[0])
    # one output per head, named after it, in the model's head order (three heads today)
    assert list(logits) == [space.head for space in SPACES] and len(logits) == 3
    assert {head: v.shape for head, v in logits.items()} == {s.head: (batch, len(s.classes)) for s in SPACES}
    parity = logit_parity(model_from_checkpoint(checkpoint, payload), ort_session(path, 1), images)
    assert parity["max_abs_logit_diff"] <= 1e-4


# (role, mode) -> bounds on the mean and the max |p_int8 - p_fp32| over 16 images, for the seeded untrained models.
# Measured on this project's 2-core AMD EPYC (AVX512-VNNI), onnxruntime's quantize_dynamic / quantize_static as
# models/onnx_export.py calls them, over torch seeds 0-19 (cnn) and 0-57 (vit); figures for WEIGHT_SEED 0 in [ ]:
#   cnn dynamic  mean 1.1e-6 .. 1.8e-6 [1.2e-6]   max 3.8e-6 .. 7.1e-6 [4.4e-6]
#   cnn static   mean 1.7e-5 .. 3.1e-5 [2.6e-5]   max 6.3e-5 .. 3.0e-4 [8.7e-5]
#   vit dynamic  mean 0.0017 .. 0.0162 [0.0031]   max 0.0062 .. 0.0455 [0.0111]
#   vit static   mean 0.0026 .. 0.0057 [0.0044]   max 0.0103 .. 0.0961 [0.0418]
# The CNN's bounds sit >= 17x above its worst seed yet 20x under the ViT's (a broken quantisation still fails); the
# ViT keeps 0.02 / 0.15 (above every seed, ~5x / ~3.5x the seeded figure): int8 kernels differ between CPUs (u8s8
# can saturate without VNNI), and the unseeded test once measured 0.0234 for static-vit, which no seed reached here.
INT8_BOUNDS = {
    ("cnn", "dynamic"): (1e-3, 1e-3),
    ("cnn", "static"): (1e-3, 5e-3),
    ("vit", "dynamic"): (0.02, 0.15),
    ("vit", "static"): (0.02, 0.15),
}


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
    mean_bound, max_bound = INT8_BOUNDS[role, mode]
    assert agreed["mean_abs_prob_diff"] < mean_bound and agreed["max_abs_prob_diff"] < max_bound, agreed
    # one agreement figure per head: the top class (multi-class) or each class at 0.5 (multi-label)
    per_head = {k: v for k, v in agreed.items() if k.endswith("_agreement")}
    assert set(per_head) == {"nih14_finding_agreement", "covid_top1_agreement", "pneumonia_top1_agreement"}
    assert all(0.0 <= v <= 1.0 for v in per_head.values())
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
    assert list(found) == list(expected) == [space.head for space in SPACES]
    assert [space.head for space in runner.label_spaces] == list(expected)  # rebuilt from the file's metadata
    for head in expected:
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
    two_heads = {**cnn_payload, "label_spaces": [space.to_dict() for space in SPACES[:2]]}
    with pytest.raises(OnnxMetadataError, match="'label_spaces'"):
        OnnxRunner(cnn_path, 1).verify(two_heads, 64)


def test_an_export_whose_outputs_are_not_its_heads_fails_the_check(exports, tmp_path):
    """check_model holds the graph's outputs to the label spaces of the metadata, in order; an export that predates
    the registry (label_spaces a mapping) is refused by the backend with how to fix it."""
    import shutil

    from models.onnx_export import check_model
    from serve.onnx_backend import OnnxRunner

    _, _, path = exports["cnn"]
    copy = shutil.copy(path, tmp_path / "model.onnx")
    reordered = [space.to_dict() for space in (SPACES[1], SPACES[0], SPACES[2])]
    write_metadata(copy, {**read_metadata(path), "label_spaces": json.dumps(reordered)})
    with pytest.raises(OnnxExportError, match="expected \\[image\\] / \\('covid', 'nih14', 'pneumonia'\\)"):
        check_model(copy)
    write_metadata(copy, {**read_metadata(path), "label_spaces": json.dumps({"nih14": ["a"], "covid": ["b"]})})
    with pytest.raises(OnnxMetadataError, match="no label_spaces list"):
        OnnxRunner(copy, 1)


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
    assert main(argv + ["--config", str(CONFIG), *(f"--set={s}" for s in sets)]) == 0
    printed = capsys.readouterr().out
    assert "max abs logit difference" in printed and "int8 (static)" in printed
    assert all(f"{space.head}_" in printed.split("int8 vs fp32")[1] for space in SPACES)  # agreement per head
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
    agreed = {k for k in run.data.metrics if k.startswith("onnx_int8_static_") and k.endswith("_agreement")}
    assert agreed == {
        f"onnx_int8_static_{k}" for k in latest["int8"]["agreement_with_fp32"] if k.endswith("_agreement")
    }
    assert len(agreed) == len(SPACES)


def test_cxr_export_refuses_a_checkpoint_of_the_other_role(exports, tmp_path, capsys):
    from pipelines.export import main

    checkpoint, _, _ = exports["vit"]
    sets = [f"--set=data.shards_dir={write_shards(tmp_path / 's')}", f"--set=export.out_dir={tmp_path}"]
    config = ["--config", str(CONFIG)]
    assert main(["--model", "cnn", "--checkpoint", str(checkpoint), *config, *sets]) == 2
    assert "a vit checkpoint, not cnn" in capsys.readouterr().err


def test_cxr_export_fails_clearly_when_parity_is_out_of_tolerance(exports, tmp_path, capsys):
    from pipelines.export import main

    checkpoint, _, _ = exports["vit"]  # the tiny ViT's logits differ by ~1e-7, over this limit
    sets = [f"data.shards_dir={write_shards(tmp_path / 's')}", f"export.out_dir={tmp_path}", "export.parity_atol=1e-10"]
    argv = ["--model", "vit", "--checkpoint", str(checkpoint), "--config", str(CONFIG)]
    assert main(argv + [f"--set={s}" for s in sets]) == 2
    err = capsys.readouterr().err
    assert "model.onnx: max abs logit difference to PyTorch" in err and "exceeds export.parity_atol 1e-10" in err
    assert not (tmp_path / "latest-vit.json").exists()
