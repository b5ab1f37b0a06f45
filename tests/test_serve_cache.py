"""The router's result cache (serve/cache.py): the LRU, the key, fingerprints, Redis (a real redis-server started
here) and, on a real local Ray, the Serve app answering repeats from the cache without ever serving an answer of
other weights or another gate.

The Redis tests need the ``redis-server`` binary (Debian's ``redis-server`` package; ``.ci/run`` installs it).
Without it they are skipped, except under CI (env ``CI`` set), where they fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from models.checkpoint import model_fingerprint
from serve import cache as cache_module
from serve.cache import (
    KEY_PREFIX,
    LruStore,
    RedisStore,
    ResultCache,
    cache_key,
    image_digest,
    roles_for,
)
from serve.pipeline import FINGERPRINT_MAX_AGE_S, EnsemblePipeline
from serve.schema import GateSettings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = GateSettings(w_cnn=0.4, threshold=0.85)
FINGERPRINTS = {"cnn": "c" * 64, "vit": "v" * 64}


def run(coroutine):
    return asyncio.run(coroutine)


def answer(value: float = 0.25, fingerprints: dict | None = None) -> dict:
    """What EnsemblePipeline.answer returns, with float32 arrays as the replicas send them."""
    return {
        "probs": {"nih14": np.full(14, value, np.float32), "covid": np.array([0.1, 0.2, 0.3, 0.4], np.float32)},
        "models_used": ["cnn"],
        "cnn_confidence": 0.9,
        "escalated": False,
        "timings": {"cnn_ms": 3.0},
        "fingerprints": fingerprints or {"cnn": FINGERPRINTS["cnn"]},
    }


class FakeMetrics:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def cache_hit(self, store: str) -> None:
        self.calls.append(("hit", store))

    def cache_miss(self, store: str) -> None:
        self.calls.append(("miss", store))

    def cache_error(self, store: str, operation: str) -> None:
        self.calls.append(("error", store, operation))


# ------------------------------------------------------------------------------------------- LRU


def test_lru_evicts_the_least_recently_used_first():
    store = LruStore(3)
    for key in "abc":
        run(store.put(key, {"v": key}))
    assert run(store.get("a")) == {"v": "a"}  # a is now the most recent
    run(store.put("d", {"v": "d"}))
    assert store.keys() == ["c", "a", "d"] and run(store.get("b")) is None
    run(store.put("c", {"v": "c2"}))  # overwriting refreshes too
    run(store.put("e", {"v": "e"}))
    assert store.keys() == ["d", "c", "e"] and len(store) == 3
    assert store.describe() == {"store": "lru", "entries": 3, "max_entries": 3}


def test_lru_never_holds_more_than_max_entries():
    store = LruStore(5)
    for index in range(50):
        run(store.put(str(index), {"i": index}))
        assert len(store) == min(index + 1, 5)
    assert store.keys() == [str(i) for i in range(45, 50)]
    with pytest.raises(ValueError, match="max_entries"):
        LruStore(0)


# ------------------------------------------------------------------------------------------- key


def base_key(**changes) -> str:
    parts = {
        "digest": image_digest(np.arange(64, dtype=np.uint8).reshape(8, 8)),
        "mode": "adaptive",
        "heads": ("nih14", "covid"),
        "settings": SETTINGS,
        "fingerprints": FINGERPRINTS,
    }
    parts.update(changes)
    return cache_key(parts["digest"], parts["mode"], parts["heads"], parts["settings"], parts["fingerprints"])


@pytest.mark.parametrize(
    "change",
    [
        {"digest": image_digest(np.arange(64, dtype=np.uint8).reshape(8, 8)[::-1])},  # other pixels
        {"digest": image_digest(np.arange(64, dtype=np.uint8).reshape(4, 16))},  # same bytes, other shape
        {"digest": image_digest(np.arange(64, dtype=np.uint16).reshape(8, 8))},  # other dtype
        {"mode": "ensemble"},
        {"heads": ("covid",)},
        {"heads": ("covid", "nih14")},  # the order is part of the request as the router sees it
        {"settings": GateSettings(w_cnn=0.5, threshold=0.85)},
        {"settings": GateSettings(w_cnn=0.4, threshold=0.8)},
        {"fingerprints": {**FINGERPRINTS, "cnn": "d" * 64}},
        {"fingerprints": {**FINGERPRINTS, "vit": "w" * 64}},  # adaptive could call the ViT
    ],
)
def test_each_component_changes_the_key(change):
    assert base_key(**change) != base_key()


def test_what_cannot_change_the_answer_leaves_the_key_alone():
    """Finding thresholds only pick findings from the probabilities, which the router does from the live settings
    on every hit; a model that cannot answer in the mode (the ViT in cnn mode) is not part of the key."""
    thresholds = GateSettings(w_cnn=0.4, threshold=0.85, finding_threshold=0.3, finding_thresholds={"Mass": 0.2})
    assert base_key(settings=thresholds) == base_key()
    cnn_only = base_key(mode="cnn")
    assert base_key(mode="cnn", fingerprints={**FINGERPRINTS, "vit": "w" * 64}) == cnn_only
    assert base_key(mode="cnn", fingerprints={"cnn": FINGERPRINTS["cnn"]}) == cnn_only
    assert image_digest(np.zeros((4, 4), np.uint8)) == image_digest(np.zeros((4, 4), np.uint8, order="F"))


def test_a_key_without_the_fingerprints_it_needs_is_refused():
    with pytest.raises(ValueError, match="fingerprint"):
        base_key(fingerprints={"cnn": FINGERPRINTS["cnn"]})  # adaptive needs the ViT's too
    assert roles_for("vit") == ("vit",) and roles_for("ensemble") == ("cnn", "vit")
    with pytest.raises(ValueError, match="unknown mode"):
        roles_for("fastest")


def test_fingerprint_follows_the_weights_not_the_path(tmp_path):
    """Two runs can both have `checkpoint_000005`: the bytes decide, and so do the backend and its ONNX file."""
    first, second, same = (tmp_path / name / "checkpoint.pt" for name in ("a", "b", "c"))
    for path, content in ((first, b"weights one"), (second, b"weights two"), (same, b"weights one")):
        path.parent.mkdir()
        path.write_bytes(content)
    torch_info: dict = {"version": "checkpoint_000005"}
    assert model_fingerprint(first, torch_info) == model_fingerprint(same, torch_info)
    assert model_fingerprint(first, torch_info) != model_fingerprint(second, torch_info)
    assert model_fingerprint(first, torch_info) == model_fingerprint(first, {"backend": "torch"})
    onnx = {"backend": "onnx", "onnx_sha256": "1" * 64}
    assert model_fingerprint(first, onnx) != model_fingerprint(first, torch_info)
    assert model_fingerprint(first, onnx) != model_fingerprint(first, {**onnx, "onnx_sha256": "2" * 64})


# ------------------------------------------------------------------------------------------- ResultCache


def test_miss_then_hit_gives_identical_values_and_counts():
    metrics = FakeMetrics()
    cache = ResultCache.from_options({"enabled": True, "max_entries": 8, "redis_url": None, "ttl_s": 60}, metrics)
    gray = np.full((16, 16), 7, np.uint8)
    first = run(cache.lookup(gray, "cnn", ("nih14", "covid"), SETTINGS, FINGERPRINTS))
    assert not first.hit and cache.marker(first) == {"hit": False, "store": "lru"}
    computed = answer()
    run(cache.remember(first, "cnn", ("nih14", "covid"), SETTINGS, computed))
    second = run(cache.lookup(gray.copy(), "cnn", ("nih14", "covid"), SETTINGS, FINGERPRINTS))
    assert second.hit and cache.marker(second) == {"hit": True, "store": "lru"}
    assert second.value["probs"]["nih14"] == [float(p) for p in computed["probs"]["nih14"]]
    assert second.value["models_used"] == ["cnn"] and "timings" not in second.value
    assert metrics.calls == [("miss", "lru"), ("hit", "lru")]
    assert cache.describe() == {
        "enabled": True,
        "store": "lru",
        "entries": 1,
        "max_entries": 8,
        "available": True,
        "hits": 1,
        "misses": 1,
        "errors": 0,
    }


def test_an_answer_is_filed_under_the_weights_that_computed_it():
    """The router looked up with the fingerprints it knew; the replica that answered had new weights (a redeploy
    mid-request): the entry goes under the new weights, so the old key still misses."""
    cache = ResultCache(LruStore(8))
    gray = np.full((16, 16), 9, np.uint8)
    new = {**FINGERPRINTS, "cnn": "n" * 64}
    lookup = run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, FINGERPRINTS))
    run(cache.remember(lookup, "cnn", ("nih14",), SETTINGS, answer(fingerprints={"cnn": new["cnn"]})))
    assert not run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, FINGERPRINTS)).hit
    assert run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, new)).hit


def test_disabled_or_unfingerprinted_means_uncached():
    off = ResultCache.from_options({"enabled": False, "max_entries": 8, "redis_url": None, "ttl_s": 60})
    gray = np.zeros((4, 4), np.uint8)
    lookup = run(off.lookup(gray, "cnn", ("nih14",), SETTINGS, FINGERPRINTS))
    assert not lookup.hit and off.marker(lookup) == {"hit": False, "store": None}
    run(off.remember(lookup, "cnn", ("nih14",), SETTINGS, answer()))
    assert off.describe() == {"enabled": False} and ResultCache.from_options(None).store is None
    on = ResultCache(LruStore(8))
    lookup = run(on.lookup(gray, "adaptive", ("nih14",), SETTINGS, {"cnn": "c" * 64, "vit": None}))
    run(on.remember(lookup, "adaptive", ("nih14",), SETTINGS, answer()))
    assert len(on.store) == 0 and on.stats.misses == 0  # an older replica without a fingerprint: no caching


# ------------------------------------------------------------------------------------------- pipeline


class FakeHandle:
    """A DeploymentHandle stand-in: ``describe`` / ``predict`` answer with this replica's fingerprint."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint, self.describes = fingerprint, 0
        handle = self

        class Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, *args):
                return handle.serve(self.name)

        self.describe, self.predict = Method("describe"), Method("predict")

    async def serve(self, method: str) -> dict:
        if method == "describe":
            self.describes += 1
            meta = {"storage_size": 32, "input_size": 32}
            return {"fingerprint": self.fingerprint, "preprocessing": meta, "label_spaces": {}, "version": "x"}
        return {
            "nih14": np.full(14, 0.5, np.float32),
            "covid": np.full(4, 0.25, np.float32),
            "fingerprint": self.fingerprint,
        }


def test_pipeline_relearns_fingerprints_from_answers_and_with_age(monkeypatch):
    handle = FakeHandle("old")
    pipeline = EnsemblePipeline({"cnn": handle, "vit": FakeHandle("vit")}, timeout_s=5)

    async def scenario():
        assert await pipeline.fingerprints(("cnn",)) == {"cnn": "old"}
        assert await pipeline.fingerprints(("cnn",)) == {"cnn": "old"} and handle.describes == 1  # fresh: kept
        handle.fingerprint = "new"  # the replica came back with other weights
        result = await pipeline.answer(np.zeros((40, 40), np.uint8), "cnn", SETTINGS)
        assert result["fingerprints"] == {"cnn": "new"} and "fingerprint" not in result["probs"]
        assert await pipeline.fingerprints(("cnn",)) == {"cnn": "new"}  # the answer made it ask again
        handle.fingerprint = "newer"
        monkeypatch.setattr("serve.pipeline.FINGERPRINT_MAX_AGE_S", 0.0)
        await asyncio.sleep(0.01)
        assert await pipeline.fingerprints(("cnn",)) == {"cnn": "newer"}  # no answer needed: it aged out

    run(scenario())


def test_concurrent_requests_share_one_describe_call(monkeypatch):
    handle = FakeHandle("c")
    pipeline = EnsemblePipeline({"cnn": handle, "vit": FakeHandle("v")}, timeout_s=5)

    async def scenario():
        await asyncio.gather(*(pipeline.fingerprints(("cnn",)) for _ in range(8)))
        assert handle.describes == 1

    run(scenario())


def test_a_model_that_cannot_describe_itself_leaves_the_request_uncached_not_failed():
    """Adaptive with the ViT down: the cache cannot key the request, but the CNN alone can still answer it."""
    from ray.serve.exceptions import RayServeException

    from serve.router import EnsembleRouter

    class DownHandle(FakeHandle):
        async def serve(self, method: str) -> dict:
            raise RayServeException("replica gone")

    router = SimpleNamespace(  # the router's state that _cached_answer reads; no Serve replica needed
        pipeline=EnsemblePipeline({"cnn": FakeHandle("c"), "vit": DownHandle("v")}, timeout_s=5),
        cache=ResultCache(LruStore(8)),
    )
    cached_answer = EnsembleRouter.func_or_class._cached_answer
    always_cnn = GateSettings(w_cnn=0.4, threshold=0.0)
    result, lookup = run(cached_answer(router, np.zeros((40, 40), np.uint8), "adaptive", ("covid",), always_cnn))
    assert result["models_used"] == ["cnn"] and not lookup.hit and len(router.cache.store) == 0


def test_bench_workload_repeats_the_asked_share_of_requests():
    from serve.bench.result_cache import workload

    order = workload(100, 0.5)
    assert len(order) == 200 and sorted(set(order)) == list(range(100))
    assert list(dict.fromkeys(order)) == list(range(100))  # unseen images come in order
    assert workload(10, 0.0) == list(range(10)) and len(workload(1000, 0.5, max_requests=50)) == 50
    with pytest.raises(ValueError, match="repeat_fraction"):
        workload(10, 1.0)


# ------------------------------------------------------------------------------------------- Redis


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throwaway ``redis-server`` on a loopback port: no persistence, its files in a temp dir."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed (apt-get install -y redis-server; .ci/run does it)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        folder.mkdir(parents=True, exist_ok=True)
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(folder)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                assert self.process.poll() is None, f"redis-server exited with {self.process.returncode}"
                assert time.monotonic() < deadline, "redis-server never answered PING"
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def test_redis_round_trip_with_prefix_and_ttl(redis_server):
    import redis

    async def scenario():
        store = RedisStore(redis_server.url, ttl_s=30)
        cache = ResultCache(store)
        gray = np.full((32, 32), 3, np.uint8)
        lookup = await cache.lookup(gray, "cnn", ("covid",), SETTINGS, FINGERPRINTS)
        assert not lookup.hit and cache.marker(lookup) == {"hit": False, "store": "redis"}
        await cache.remember(lookup, "cnn", ("covid",), SETTINGS, answer(0.125))
        again = await cache.lookup(gray, "cnn", ("covid",), SETTINGS, FINGERPRINTS)
        await store.close()
        return again

    again = run(scenario())
    assert again.hit and again.value["probs"]["nih14"] == [0.125] * 14
    client = redis.Redis(port=redis_server.port)
    keys = [key.decode() for key in client.keys(KEY_PREFIX + "*")]
    assert len(keys) == 1 and keys[0].startswith("cxr:result:v1:")
    assert 0 < client.pttl(keys[0]) <= 30_000
    client.close()


def test_redis_down_answers_uncached_counts_and_logs_once_per_outage(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache_module, "RETRY_AFTER_S", 0.0)  # try Redis on every request, to count each failure
    port = free_port()  # nothing listens there yet
    metrics = FakeMetrics()
    cache = ResultCache(RedisStore(f"redis://127.0.0.1:{port}/0", ttl_s=30), metrics)
    gray = np.full((8, 8), 1, np.uint8)

    async def two_requests() -> float:
        started = time.perf_counter()
        for _ in range(2):
            lookup = await cache.lookup(gray, "cnn", ("nih14",), SETTINGS, FINGERPRINTS)
            assert not lookup.hit
            await cache.remember(lookup, "cnn", ("nih14",), SETTINGS, answer())
        return time.perf_counter() - started

    with caplog.at_level(logging.WARNING, logger="serve.cache"):
        elapsed = run(two_requests())
    assert elapsed < 2.0
    assert metrics.calls == [("error", "redis", "get"), ("error", "redis", "put")] * 2
    assert cache.describe()["available"] is False and cache.describe()["errors"] == 4
    assert sum("unavailable" in r.message for r in caplog.records) == 1
    server = RedisServer(tmp_path / "redis", port)  # Redis comes (back) up on that port

    async def miss_then_hit() -> None:
        for hit in (False, True):
            lookup = await cache.lookup(gray, "cnn", ("nih14",), SETTINGS, FINGERPRINTS)
            assert lookup.hit is hit
            await cache.remember(lookup, "cnn", ("nih14",), SETTINGS, answer())

    try:
        with caplog.at_level(logging.WARNING, logger="serve.cache"):
            run(miss_then_hit())
        assert cache.describe()["available"] is True and cache.stats.errors == 4
        assert any("back after" in r.message for r in caplog.records)
    finally:
        server.stop()


def test_a_failed_redis_is_left_alone_for_a_while(monkeypatch):
    """Within RETRY_AFTER_S of a failure, requests skip Redis (no timeouts paid, no errors counted)."""
    monkeypatch.setattr(cache_module, "RETRY_AFTER_S", 60.0)
    cache = ResultCache(RedisStore(f"redis://127.0.0.1:{free_port()}/0", ttl_s=30))
    gray = np.full((8, 8), 2, np.uint8)

    async def requests(count: int) -> None:
        for _ in range(count):
            lookup = await cache.lookup(gray, "cnn", ("nih14",), SETTINGS, FINGERPRINTS)
            await cache.remember(lookup, "cnn", ("nih14",), SETTINGS, answer())

    run(requests(5))
    assert cache.stats.errors == 1 and cache.stats.misses == 0


# ------------------------------------------------------------------------------------------- Serve, end to end


@pytest.fixture(scope="module")
def cache_app(ray_session, tmp_path_factory):
    """One app (LRU first, Redis later) with a CNN and ViT made here, plus a second CNN checkpoint whose folder
    has the same name (so the same version string) and other weights, and a copy of the first to swap in place."""
    import torch
    from ray import serve
    from ray.serve.context import _get_global_client
    from test_serve_app import KEY_ENV, deploy_schema, free_port, tiny_checkpoint

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
        "serve.request_timeout_s=20",
        "serve.router={num_cpus: 0.4, max_ongoing_requests: 8, max_queued_requests: 16}",
        "serve.cnn={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
        "serve.vit={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
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
        "deploy_schema": deploy_schema,
    }
    deploy(app, live_cnn)
    yield app
    serve.shutdown()


def deploy(app: dict, cnn: Path, extra_sets: tuple[str, ...] = (), user_config: dict | None = None) -> None:
    """(Re)deploy as `serve deploy` does; new args restart every replica, router included."""
    import requests

    args = {
        "config": str(ROOT / "ray_config.yaml"),
        "sets": [*app["sets"], *extra_sets],
        "cnn": str(cnn),
        "vit": str(app["checkpoints"]["vit"]),
    }
    app["client"].deploy_apps(app["deploy_schema"](args, app["port"], user_config), _blocking=True)
    deadline = time.monotonic() + 60
    while requests.get(app["url"] + "/v1/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "app never became ready"
        time.sleep(0.3)


def predict(app: dict, data: bytes, mode: str = "adaptive") -> dict:
    import requests
    from test_serve_app import HEADERS

    answer = requests.post(app["url"] + "/v1/predict", params={"mode": mode}, data=data, headers=HEADERS, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def model_info(app: dict) -> dict:
    import requests
    from test_serve_app import HEADERS

    return requests.get(app["url"] + "/v1/model", headers=HEADERS, timeout=10).json()


def same_answer(first: dict, second: dict) -> bool:
    keys = ("nih14", "covid", "confidence", "cnn_confidence", "models_used", "gate", "model_versions", "input")
    return all(first[key] == second[key] for key in keys)


def prometheus_counts(name: str) -> float:
    """The sum of a counter over its tags, as the node's metrics agent exports it for Prometheus."""
    import ray
    import requests

    port = ray._private.worker.global_worker.node.metrics_export_port
    total = 0.0
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith((f"ray_{name}_total{{", f"ray_{name}{{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.ray
@pytest.mark.slow
def test_a_repeated_image_is_a_marked_hit_with_the_same_answer_and_counted(cache_app):
    from test_serve_app import png

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
    import requests
    from test_serve_app import HEADERS

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


@pytest.mark.ray
@pytest.mark.slow
def test_lru_a_reconfigured_gate_misses(cache_app):
    from test_serve_app import png

    reconfigure_misses(cache_app, cache_app["live_cnn"], png(160, seed=21), "lru")


@pytest.mark.ray
@pytest.mark.slow
def test_lru_new_weights_behind_the_same_path_miss_while_the_router_lives_on(cache_app):
    """The checkpoint file is replaced in place and Serve restarts the CNN replica (killed here): same path, same
    version, same router replica with its LRU, other weights; the first answer after it must be the new model's.

    The router trusts the fingerprints it learned for FINGERPRINT_MAX_AGE_S: a hit within that time of the kill
    is the old replica's answer while no other weights serve yet; once that has passed, no old answer comes back."""
    import ray
    from test_serve_app import png, replica_actors

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


@pytest.mark.ray
@pytest.mark.slow
def test_redis_hits_reconfigures_and_follows_the_weights_across_a_redeploy(cache_app, tmp_path_factory):
    """With Redis the entries outlive the router: only the weights' fingerprints keep a redeploy with another
    checkpoint (same version string) from serving the old answer. Then Redis goes away: requests still succeed."""
    from test_serve_app import png

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
