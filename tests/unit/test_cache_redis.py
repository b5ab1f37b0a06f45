"""The result cache on a real Redis (a throwaway `redis-server` started here): round trip with prefix and TTL, an
outage answered uncached and logged once, and the back-off after a failure.

They need the ``redis-server`` binary (Debian's ``redis-server`` package; `make test-deps` installs it as root).
Without it they skip, except under CI (env ``CI`` set), where they fail."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from serve import cache as cache_module
from serve.cache import KEY_PREFIX, RedisStore, ResultCache
from serve.schema import GateSettings
from tests.helpers import CACHE_FINGERPRINTS as FINGERPRINTS
from tests.helpers import RecordingMetrics as FakeMetrics
from tests.helpers import RedisServer, free_port
from tests.helpers import router_answer as answer
from tests.helpers import run_async as run

SETTINGS = GateSettings(w_cnn=0.4, threshold=0.85)


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
