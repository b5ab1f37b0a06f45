"""The result cache in the running Serve app on the session's local Ray, over HTTP: a repeat is a marked, counted
hit; a reconfigured gate, new weights behind the same path (LRU) and a redeploy with other weights (Redis) all
miss; Redis going away leaves requests answered uncached. The Redis test needs ``redis-server`` (see
tests/unit/test_cache_redis.py)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import requests

from serve.pipeline import FINGERPRINT_MAX_AGE_S
from tests.helpers import (
    CONFIG,
    HEADERS,
    KEY_ENV,
    SMALL_SERVE_SETS,
    RedisServer,
    deploy_schema,
    free_port,
    png,
    replica_actors,
    tiny_checkpoint,
    wait_healthy,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cache_app(ray_session, tmp_path_factory):
    """One app (LRU first, Redis later) with a CNN and ViT made here, plus a second CNN checkpoint whose folder
    has the same name (so the same version string) and other weights, and a copy of the first to swap in place."""
    import torch
    from ray import serve
    from ray.serve.context import _get_global_client

    folder = tmp_path_factory.mktemp("cache-app")
    torch.manual_seed(1)
    checkpoints = {"cnn": tiny_checkpoint(folder / "one", "cnn", "test_efficientnet")}
    checkpoints["vit"] = tiny_checkpoint(folder / "one", "vit", "test_vit")
    torch.manual_seed(2)
    other_cnn = tiny_checkpoint(folder / "two", "cnn", "test_efficientnet")
    assert other_cnn.name == checkpoints["cnn"].name  # two runs' checkpoints can share a version string
    live_cnn = shutil.copytree(checkpoints["cnn"], folder / "live" / "cnn")  # its file is swapped in place later
    port = free_port()
    sets = [
        f"train.run_dir={folder / 'run'}",
        f"serve.api_key_env={KEY_ENV}",
        *SMALL_SERVE_SETS,
        "ensemble.threshold=0.85",
        "ensemble.w_cnn=0.4",
    ]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = {
        "url": f"http://127.0.0.1:{port}",
        "client": _get_global_client(),
        "port": port,
        "sets": sets,
        "checkpoints": checkpoints,
        "other_cnn": other_cnn,
        "live_cnn": live_cnn,
    }
    deploy(app, live_cnn)
    yield app
    serve.shutdown()


def deploy(app: dict, cnn: Path, extra_sets: tuple[str, ...] = (), user_config: dict | None = None) -> None:
    """(Re)deploy as `serve deploy` does; new args restart every replica, router included."""
    args = {
        "config": str(CONFIG),
        "sets": [*app["sets"], *extra_sets],
        "cnn": str(cnn),
        "vit": str(app["checkpoints"]["vit"]),
    }
    app["client"].deploy_apps(deploy_schema(args, app["port"], user_config), _blocking=True)
    wait_healthy(app["url"], poll_s=0.3)


def predict(app: dict, data: bytes, mode: str = "adaptive") -> dict:
    answer = requests.post(app["url"] + "/v1/predict", params={"mode": mode}, data=data, headers=HEADERS, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def model_info(app: dict) -> dict:
    return requests.get(app["url"] + "/v1/model", headers=HEADERS, timeout=10).json()


def same_answer(first: dict, second: dict) -> bool:
    keys = ("heads", "confidence", "cnn_confidence", "models_used", "gate", "model_versions", "input")
    return all(first[key] == second[key] for key in (*keys, *first["heads"]))  # every head's answer too


def prometheus_counts(name: str) -> float:
    """The sum of a counter over its tags, as the node's metrics agent exports it for Prometheus."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    total = 0.0
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith((f"ray_{name}_total{{", f"ray_{name}{{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_repeated_image_is_a_marked_hit_with_the_same_answer_and_counted(cache_app):
    data = png(160, seed=21)
    first, second = predict(cache_app, data), predict(cache_app, data)
    assert first["cache"] == {"hit": False, "store": "lru"} and second["cache"] == {"hit": True, "store": "lru"}
    assert same_answer(first, second)
    assert second["latency_ms"]["total"] > 0 and "cnn" not in second["latency_ms"]  # no model was called
    cache = model_info(cache_app)["cache"]
    assert cache["store"] == "lru" and cache["entries"] == 1 and cache["max_entries"] == 2048
    assert (cache["hits"], cache["misses"], cache["errors"]) == (1, 1, 0)
    deadline = time.monotonic() + 45  # the metrics agent exports what replicas report every few seconds
    while prometheus_counts("cxr_cache_hits") < 1 or prometheus_counts("cxr_cache_misses") < 1:
        assert time.monotonic() < deadline, "cxr_cache_hits / cxr_cache_misses never reached Prometheus"
        time.sleep(1)


def reconfigure_misses(app: dict, cnn: Path, data: bytes, store: str, extra_sets: tuple[str, ...] = ()) -> None:
    """A live gate change (user_config; no replica restarts): the same image misses, then hits again."""
    assert predict(app, data)["cache"]["hit"]
    threshold = model_info(app)["ensemble"]["threshold"]
    new_threshold = 0.0 if threshold != 0.0 else 0.5
    deploy(app, cnn, extra_sets, user_config={"w_cnn": 0.4, "threshold": new_threshold})
    deadline = time.monotonic() + 30
    while model_info(app)["ensemble"]["threshold"] != new_threshold:
        assert time.monotonic() < deadline, "reconfigure never reached the router"
        time.sleep(0.2)
    after = predict(app, data)
    assert after["cache"] == {"hit": False, "store": store} and after["gate"]["threshold"] == new_threshold
    assert predict(app, data)["cache"] == {"hit": True, "store": store}


def wait_for_recovery(app: dict, data: bytes, mode: str) -> dict:
    """Post until the app answers 200 again (503 while a model replica is down) and return that answer."""
    deadline = time.monotonic() + 120
    while True:
        answer = requests.post(
            app["url"] + "/v1/predict", params={"mode": mode}, data=data, headers=HEADERS, timeout=30
        )
        assert answer.status_code in (200, 503), answer.text
        if answer.status_code == 200:
            return answer.json()
        assert time.monotonic() < deadline, "no recovery within 120 s"
        time.sleep(0.5)


def test_lru_a_reconfigured_gate_misses(cache_app):
    reconfigure_misses(cache_app, cache_app["live_cnn"], png(160, seed=21), "lru")


def test_lru_new_weights_behind_the_same_path_miss_while_the_router_lives_on(cache_app):
    """The checkpoint file is replaced in place and Serve restarts the CNN replica (killed here): same path, same
    version, same router replica with its LRU, other weights; the first answer after it must be the new model's.

    The router trusts the fingerprints it learned for FINGERPRINT_MAX_AGE_S: a hit within that time of the kill
    is the old replica's answer while no other weights serve yet; once that has passed, no old answer comes back."""
    import ray

    data = png(160, seed=23)
    first, second = predict(cache_app, data, "cnn"), predict(cache_app, data, "cnn")
    assert second["cache"] == {"hit": True, "store": "lru"} and same_answer(first, second)
    router_before = {n: a for n, a in replica_actors().items() if n.startswith("EnsembleRouter")}
    live_file = cache_app["live_cnn"] / "checkpoint.pt"
    live_file.write_bytes((cache_app["other_cnn"] / "checkpoint.pt").read_bytes())
    cnn_actor = next(a for n, a in replica_actors().items() if n.startswith("CNNModel"))
    os.kill(ray._private.state.actors(cnn_actor)["Pid"], signal.SIGKILL)
    time.sleep(FINGERPRINT_MAX_AGE_S + 0.2)
    after = wait_for_recovery(cache_app, data, "cnn")
    assert after["cache"] == {"hit": False, "store": "lru"}
    assert after["nih14"]["probabilities"] != first["nih14"]["probabilities"]
    assert {n: a for n, a in replica_actors().items() if n.startswith("EnsembleRouter")} == router_before
    # the first answer may have gone uncached (a describe that timed out while the replica loaded): by the third
    # the new weights' answer is cached, and every answer is the new model's
    later = [predict(cache_app, data, "cnn") for _ in range(3)]
    assert later[-1]["cache"]["hit"] and all(same_answer(after, answer) for answer in later)


def test_redis_hits_reconfigures_and_follows_the_weights_across_a_redeploy(cache_app, tmp_path_factory):
    """With Redis the entries outlive the router: only the weights' fingerprints keep a redeploy with another
    checkpoint (same version string) from serving the old answer. Then Redis goes away: requests still succeed."""
    server = RedisServer(tmp_path_factory.mktemp("serve-redis"))
    try:
        redis_sets = (f"serve.cache.redis_url={server.url}",)
        data = png(160, seed=22)
        deploy(cache_app, cache_app["checkpoints"]["cnn"], redis_sets)
        info = model_info(cache_app)
        assert info["cache"]["store"] == "redis" and info["cache"]["url"] == server.url
        fingerprint = info["models"]["cnn"]["fingerprint"]
        first, second = predict(cache_app, data), predict(cache_app, data)
        assert first["cache"] == {"hit": False, "store": "redis"} and second["cache"]["hit"]
        assert same_answer(first, second)
        reconfigure_misses(cache_app, cache_app["checkpoints"]["cnn"], data, "redis", redis_sets)
        counts = model_info(cache_app)["cache"]
        assert (counts["hits"], counts["misses"], counts["errors"]) == (3, 2, 0)

        cnn_first = predict(cache_app, data, "cnn")
        assert predict(cache_app, data, "cnn")["cache"]["hit"]
        deploy(cache_app, cache_app["other_cnn"], redis_sets)
        info = model_info(cache_app)
        assert info["models"]["cnn"]["version"] == cnn_first["model_versions"]["cnn"]  # same version string ...
        assert info["models"]["cnn"]["fingerprint"] != fingerprint  # ... other weights
        other = predict(cache_app, data, "cnn")
        assert other["cache"] == {"hit": False, "store": "redis"}
        assert other["nih14"]["probabilities"] != cnn_first["nih14"]["probabilities"]
        assert predict(cache_app, data, "cnn")["cache"] == {"hit": True, "store": "redis"}

        server.stop()  # Redis goes away under the running app: requests still succeed, uncached
        down = predict(cache_app, data, "cnn")
        assert down["cache"] == {"hit": False, "store": "redis"} and same_answer(other, down)
        cache = model_info(cache_app)["cache"]
        assert cache["available"] is False and cache["errors"] >= 1
    finally:
        server.stop()
