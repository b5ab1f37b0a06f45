"""The Serve application end to end on a real local Ray: real HTTP on 127.0.0.1, tiny untrained checkpoints.

One app for the whole module, deployed the way `serve deploy` does it: ``serve/serve_config.yaml`` with its
``args`` pointed at checkpoints made here, applied through the Serve controller. Tests run in file order; the
live reconfigure, the overload burst and the replica kill come last.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image
from test_serve_inputs import make_dicom

from models.checkpoint import PreprocessSpec, model_from_checkpoint, save_checkpoint
from models.factory import build_model
from models.labels import NIH14
from serve.preprocess import Preprocessor
from serve.replicas import probabilities

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
KEY_ENV = "CXR_TEST_API_KEY"
HEADERS = {"X-API-Key": API_KEY}
MAX_UPLOAD_MB = 0.5
ROUTER_QUEUE = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(size: int = 200, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_checkpoint(folder: Path, role: str, arch: str) -> Path:
    model = build_model(arch, 64)
    config = {"data": {"storage_size": 64}, "model": {"input_size": 64}}
    return save_checkpoint(folder / role, model, role=role, epoch=0, config=config, metrics={"val_score": 0.5})


def deploy_schema(app_args: dict, port: int, user_config: dict | None = None):
    """serve/serve_config.yaml with test args, as `serve deploy` would send it."""
    from ray.serve.schema import ServeDeploySchema

    tree = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    tree["http_options"]["port"] = port
    app = tree["applications"][0]
    app["args"] = app_args
    app["runtime_env"] = {"env_vars": {KEY_ENV: API_KEY}}  # how an operator hands the key to the router
    if user_config is not None:
        app["deployments"] = [{"name": "EnsembleRouter", "user_config": user_config}]
    return ServeDeploySchema.model_validate(tree)


def replica_actors() -> dict[str, str]:
    """Serve replica actor name -> actor id (the name carries the replica id; both change on a restart)."""
    import ray

    found = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::cxr#"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            found[actor["name"].split("#")[1] + "#" + actor["name"].split("#")[2]] = handle._actor_id.hex()
    return found


@pytest.fixture(scope="module")
def shards_config(ray_session, tmp_path_factory):
    """Ingested tiny layouts for `--try`; made before the app deploys, whose replicas leave Ray Data no whole CPU."""
    from layout_factory import write_layouts
    from pipelines.config import load_config
    from pipelines.data.ingest import ingest

    root = tmp_path_factory.mktemp("try")
    write_layouts(root, patients=12, covid_per_class=5)
    cfg = load_config(None, sets=["data.storage_size=32", "data.rows_per_shard=16", f"data.shards_dir={root}/s"])
    ingest(cfg, root / "nih", root / "covid", root / "s")
    return cfg


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory, shards_config):
    from ray import serve
    from ray.serve.context import _get_global_client

    folder = tmp_path_factory.mktemp("serve")
    checkpoints = {
        "cnn": tiny_checkpoint(folder, "cnn", "test_efficientnet"),
        "vit": tiny_checkpoint(folder, "vit", "test_vit"),
    }
    port = free_port()
    sets = [
        f"train.run_dir={folder / 'run'}",
        f"serve.api_key_env={KEY_ENV}",
        f"serve.max_upload_mb={MAX_UPLOAD_MB}",
        "serve.max_pixels=4000000",
        "serve.max_batch_images=4",
        "serve.request_timeout_s=20",
        f"serve.router={{num_cpus: 0.4, max_ongoing_requests: 4, max_queued_requests: {ROUTER_QUEUE}}}",
        "serve.cnn={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
        "serve.vit={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
        "ensemble.threshold=0.85",
        "ensemble.w_cnn=0.4",
    ]
    args = {"config": str(ROOT / "ray_config.yaml"), "sets": sets, **{k: str(v) for k, v in checkpoints.items()}}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = _get_global_client()
    client.deploy_apps(deploy_schema(args, port), _blocking=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/v1/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "app never became ready"
        time.sleep(0.5)
    yield {"url": url, "client": client, "args": args, "port": port, "checkpoints": checkpoints}
    serve.shutdown()


def post(served, data=None, files=None, mode=None, headers=HEADERS, path="/v1/predict", timeout=60):
    params = {"mode": mode} if mode else None
    return requests.post(served["url"] + path, data=data, files=files, params=params, headers=headers, timeout=timeout)


# ------------------------------------------------------------------------------------------- endpoints


def test_health_and_model_describe_both_models(served):
    health = requests.get(served["url"] + "/v1/health", timeout=10)
    assert health.status_code == 200 and health.json() == {
        "status": "ready",
        "models": {"cnn": "ready", "vit": "ready"},
    }
    info = requests.get(served["url"] + "/v1/model", headers=HEADERS, timeout=10).json()
    assert info["models"]["cnn"]["arch"] == "test_efficientnet" and info["models"]["vit"]["arch"] == "test_vit"
    assert info["models"]["cnn"]["checkpoint"] == str(served["checkpoints"]["cnn"])
    assert info["models"]["cnn"]["preprocessing"]["storage_size"] == 64
    assert len(info["models"]["cnn"]["label_spaces"]["nih14"]) == 14
    assert info["ensemble"]["threshold"] == 0.85 and info["ensemble"]["w_cnn"] == 0.4


def test_cnn_mode_answers_what_the_checkpoint_computes_in_process(served):
    data = png(300, seed=1)
    answer = post(served, data=data, mode="cnn")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["models_used"] == ["cnn"] and body["mode"] == "cnn" and body["input"]["format"] == "png"
    model = model_from_checkpoint(served["checkpoints"]["cnn"])
    gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    expected = probabilities(model, Preprocessor(PreprocessSpec(64, 64))(gray)[None], "cpu")
    served_nih = np.array(list(body["nih14"]["probabilities"].values()))
    served_covid = np.array(list(body["covid"]["probabilities"].values()))
    np.testing.assert_allclose(served_nih, expected["nih14"][0], atol=1e-5)
    np.testing.assert_allclose(served_covid, expected["covid"][0], atol=1e-5)
    assert body["covid"]["top_class"] == list(body["covid"]["probabilities"])[int(np.argmax(served_covid))]
    assert body["nih14"]["findings"] == [k for k, v in body["nih14"]["probabilities"].items() if v >= 0.5]


@pytest.mark.parametrize(("mode", "used"), [("vit", ["vit"]), ("ensemble", ["cnn", "vit"])])
def test_forced_modes(served, mode, used):
    body = post(served, files={"file": ("x.png", png(seed=2))}, mode=mode).json()
    assert body["models_used"] == used and body["mode"] == mode
    assert abs(sum(body["covid"]["probabilities"].values()) - 1.0) < 1e-4
    assert set(body["model_versions"]) == set(used)


def test_ensemble_is_the_weighted_mean_of_both_models(served):
    data = png(seed=3)
    cnn, vit, fused = (post(served, data=data, mode=m).json() for m in ("cnn", "vit", "ensemble"))
    for head in ("nih14", "covid"):
        for name, value in fused[head]["probabilities"].items():
            expected = 0.4 * cnn[head]["probabilities"][name] + 0.6 * vit[head]["probabilities"][name]
            assert value == pytest.approx(expected, abs=1e-5)


def test_adaptive_gate_uses_the_configured_threshold(served):
    body = post(served, data=png(seed=4)).json()
    assert body["mode"] == "adaptive" and body["gate"]["threshold"] == 0.85
    escalated = body["cnn_confidence"] < 0.85
    assert body["gate"]["escalated"] == escalated
    assert body["models_used"] == (["cnn", "vit"] if escalated else ["cnn"])


def test_gate_scores_only_the_head_the_caller_reads(served):
    """`?head=covid`: the gate sees the covid head's confidence (its top probability), as tuning scores a COVID
    image; both heads are still answered. Without `head`, the lower of the two heads' confidences."""
    both = post(served, data=png(seed=5), mode="cnn").json()
    covid = requests.post(
        served["url"] + "/v1/predict", params={"head": "covid"}, data=png(seed=5), headers=HEADERS, timeout=60
    ).json()
    nih_conf = min(max(p, 1 - p) for p in both["nih14"]["probabilities"].values())
    top = both["covid"]["top_probability"]
    assert both["cnn_confidence"] == pytest.approx(min(nih_conf, top), abs=1e-6)
    assert covid["cnn_confidence"] == pytest.approx(top, abs=1e-6) and covid["gate"]["heads"] == ["covid"]
    assert covid["gate"]["escalated"] == (top < 0.85) and set(covid["nih14"]["probabilities"]) == set(NIH14)
    url = served["url"] + "/v1/predict"
    bad = requests.post(url, params={"head": "lungs"}, data=png(), headers=HEADERS, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["reason"] == "bad_head"


def test_dicom_upload(served):
    pixels = np.add.outer(np.arange(128), np.arange(128)).astype(np.uint16) * 16
    body = post(served, data=make_dicom(pixels, modality="CR", photometric="MONOCHROME1"), mode="cnn").json()
    assert body["input"] == {"format": "dicom", "width": 128, "height": 128}


def test_batch_answers_each_image_in_order(served):
    files = [
        ("files", ("a.png", png(seed=5))),
        ("files", ("b.txt", b"not an image")),
        ("files", ("c.dcm", make_dicom(np.ones((64, 64), np.uint16), modality="CT"))),
        ("files", ("d.png", png(seed=6)[:300])),
    ]
    answer = post(served, files=files, path="/v1/predict/batch", mode="cnn")
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["filename"] for r in results] == ["a.png", "b.txt", "c.dcm", "d.png"]
    assert [r["status"] for r in results] == [200, 415, 415, 400]
    assert results[0]["models_used"] == ["cnn"]
    assert results[2]["error"]["reason"] == "modality_not_allowed"


def test_batch_limits(served):
    too_many = [("files", (f"{i}.png", png(32, seed=i))) for i in range(5)]
    answer = post(served, files=too_many, path="/v1/predict/batch")
    assert answer.status_code == 413 and answer.json()["error"]["reason"] == "too_many_images"
    raw = post(served, data=png(), path="/v1/predict/batch")
    assert raw.status_code == 400 and raw.json()["error"]["reason"] == "expected_multipart"


# ------------------------------------------------------------------------------------------- explanations


def explain(served, data, headers=HEADERS, **params):
    return requests.post(served["url"] + "/v1/explain", data=data, params=params, headers=headers, timeout=60)


def test_explain_cnn_is_the_grad_cam_of_the_checkpoint_in_process(served):
    from models.explain import grad_cam

    data = png(300, seed=21)
    answer = explain(served, data, head="nih14", target="Cardiomegaly", model="cnn")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["head"], body["target"], body["model"]) == ("nih14", "Cardiomegaly", "cnn")
    model = model_from_checkpoint(served["checkpoints"]["cnn"])
    gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    expected = grad_cam(model, Preprocessor(PreprocessSpec(64, 64))(gray)[None], "nih14", NIH14.index("Cardiomegaly"))
    served_map = np.array(body["map"]["values"])
    assert served_map.shape == (body["map"]["height"], body["map"]["width"]) == expected[0].cam.shape
    np.testing.assert_allclose(served_map, expected[0].cam, atol=2e-3)  # the JSON rounds to 4 decimals
    assert body["probability"] == pytest.approx(expected[0].probability, abs=1e-5)
    assert body["method"]["cnn"].startswith("grad-cam on backbone.blocks")
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (256, 256)
    assert body["model_versions"] == {"cnn": "cnn"} and body["latency_ms"]["explain"] > 0


def test_explain_defaults_to_the_top_label_and_fuses_the_ensemble(served):
    data = png(seed=22)
    predicted = post(served, data=data, mode="ensemble").json()
    top = max(predicted["covid"]["probabilities"], key=predicted["covid"]["probabilities"].get)
    body = explain(served, data, head="covid", model="ensemble").json()
    assert body["target"] == top and set(body["method"]) == {"cnn", "vit"}
    assert body["probability"] == pytest.approx(predicted["covid"]["probabilities"][top], abs=1e-5)
    vit = explain(served, data, head="covid", model="vit", target=top).json()
    assert vit["method"]["vit"].startswith("grad-cam on backbone.blocks") and vit["map"]["height"] == 4


def test_explain_png_format_answers_the_image(served):
    answer = explain(served, png(seed=23), model="vit", format="png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(answer.content)).size == (256, 256)


@pytest.mark.parametrize(
    ("params", "data", "status", "reason"),
    [
        ({"target": "Cardiomegally"}, None, 400, "bad_target"),
        ({"model": "adaptive"}, None, 400, "bad_model"),
        ({"head": "chexpert"}, None, 400, "bad_head"),
        ({}, b"not an image", 415, "unsupported_type"),
        ({}, b"\x89PNG" + bytes(int(MAX_UPLOAD_MB * 2**20)), 413, "too_large"),
    ],
)
def test_explain_validates_like_predict(served, params, data, status, reason):
    answer = explain(served, data if data is not None else png(seed=24), **params)
    assert answer.status_code == status and answer.json()["error"]["reason"] == reason, answer.text
    if reason == "bad_target":
        assert "Cardiomegaly" in answer.json()["error"]["detail"]  # the known labels are listed


def test_explain_needs_the_key(served):
    assert explain(served, png(seed=25), headers={}).status_code == 401


def test_try_sends_test_split_files_and_prints_one_line_each(served, shards_config, capsys):
    """`cxr serve --try N` (the demo's last step): original test-split files from ingest's folders, over HTTP."""
    from serve.smoke import pick_test_images, try_images

    cfg = shards_config
    samples = pick_test_images(cfg, 4)
    assert [s.source for s in samples] == ["nih", "covid", "nih", "covid"]
    assert all(s.path.is_file() for s in samples)
    assert try_images(served["url"], cfg, 4, API_KEY) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("truth:" in line and "models: cnn" in line for line in lines)
    assert try_images(served["url"], cfg, 1, "wrong-key") == 1  # a refused request is counted, not hidden


# ------------------------------------------------------------------------------------------ error codes


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (b"", 400, "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, 400, None),  # PNG signature, garbage after it
        (b"plain text is not an image", 415, "unsupported_type"),
        (b"GIF89a" + b"\0" * 64, 415, "unsupported_type"),
        (os.urandom(int(MAX_UPLOAD_MB * 1024 * 1024) + 10), 413, "too_large"),
    ],
)
def test_bad_uploads_get_json_errors(served, payload, status, reason):
    answer = post(served, data=payload)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["status"] == status and (reason is None or error["reason"] == reason)


def test_decompression_bomb_is_413(served):
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")  # 25 Mpx, ~25 kB on the wire
    answer = post(served, data=buffer.getvalue())
    assert answer.status_code == 413 and "5000x5000" in answer.json()["error"]["detail"]


def test_truncated_png_and_bad_mode_are_400(served):
    assert post(served, data=png()[:500]).status_code == 400
    answer = post(served, data=png(), mode="fastest")
    assert answer.status_code == 400 and answer.json()["error"]["reason"] == "bad_mode"


def test_api_key_is_required(served):
    assert post(served, data=png(), headers={}).status_code == 401
    assert post(served, data=png(), headers={"X-API-Key": "wrong"}).json()["error"]["reason"] == "unauthorized"
    assert post(served, data=png(), headers={"Authorization": f"Bearer {API_KEY}"}, mode="cnn").status_code == 200
    assert requests.get(served["url"] + "/v1/model", timeout=10).status_code == 401
    assert requests.get(served["url"] + "/v1/health", timeout=10).status_code == 200  # probes carry no key


# --------------------------------------------------------------------------- reconfigure, overload, fault


def test_live_reconfigure_changes_the_gate_without_restarting_replicas(served):
    before = replica_actors()
    assert {name.split("#")[0] for name in before} == {"CNNModel", "ViTModel", "EnsembleRouter"}
    always_cnn = {"w_cnn": 0.7, "threshold": 0.0}  # confidence >= 0 always: the CNN answers alone
    served["client"].deploy_apps(deploy_schema(served["args"], served["port"], always_cnn), _blocking=True)
    deadline = time.monotonic() + 30
    while requests.get(served["url"] + "/v1/model", headers=HEADERS, timeout=10).json()["ensemble"]["w_cnn"] != 0.7:
        assert time.monotonic() < deadline, "reconfigure never reached the router"
        time.sleep(0.2)
    body = post(served, data=png(seed=7)).json()
    gate = {"threshold": 0.0, "w_cnn": 0.7, "heads": ["nih14", "covid"], "escalated": False}
    assert body["models_used"] == ["cnn"] and body["gate"] == gate
    always_vit = {"w_cnn": 0.7, "threshold": 1.0}
    served["client"].deploy_apps(deploy_schema(served["args"], served["port"], always_vit), _blocking=True)
    deadline = time.monotonic() + 30
    while requests.get(served["url"] + "/v1/model", headers=HEADERS, timeout=10).json()["ensemble"]["threshold"] != 1.0:
        assert time.monotonic() < deadline, "reconfigure never reached the router"
        time.sleep(0.2)
    body = post(served, data=png(seed=7)).json()
    assert body["models_used"] == ["cnn", "vit"] and body["gate"]["escalated"] is True
    assert replica_actors() == before  # same replicas (names carry replica ids), same actors


def test_overload_answers_503_fast(served):
    """A burst far past the router's max_ongoing + max_queued: the excess is shed at once with 503. Distinct
    images, so no admitted request is a result-cache hit: each one is model work."""
    images, start = [png(400, seed=100 + i) for i in range(48)], threading.Barrier(48)

    def one(index):
        start.wait()
        began = time.perf_counter()
        answer = post(served, data=images[index], mode="ensemble")
        return answer.status_code, time.perf_counter() - began

    with ThreadPoolExecutor(48) as pool:
        outcomes = list(pool.map(one, range(48)))
    statuses = [status for status, _ in outcomes]
    shed = sorted(seconds for status, seconds in outcomes if status == 503)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and len(shed) >= 48 - 4 * (4 + ROUTER_QUEUE), statuses
    assert shed[len(shed) // 2] < 1.0, f"median 503 took {shed[len(shed) // 2]:.2f}s"
    assert post(served, data=png(seed=10), mode="cnn").status_code == 200  # and it recovers at once (a new image)


def test_killed_model_replica_is_restarted_and_requests_succeed_again(served):
    import ray

    cnn_name, cnn_actor = next((n, a) for n, a in replica_actors().items() if n.startswith("CNNModel"))
    pid = ray._private.state.actors(cnn_actor)["Pid"]
    os.kill(pid, signal.SIGKILL)
    killed_at, statuses = time.monotonic(), []
    while True:
        answer = post(served, data=png(seed=9), mode="cnn", timeout=30)
        statuses.append(answer.status_code)
        if answer.status_code == 200:
            break
        assert time.monotonic() - killed_at < 120, f"no recovery within 120 s: {statuses}"
        time.sleep(0.5)
    recovered_s = time.monotonic() - killed_at
    assert answer.json()["cache"]["hit"] is False  # the new replica answered, not the result cache
    assert set(statuses) <= {200, 503}, statuses  # while it is down: 503 with a reason, never a crash
    assert cnn_name not in replica_actors()  # a new replica took its place
    print(f"recovered {recovered_s:.1f}s after SIGKILL; statuses while down: {statuses}")
