"""The router's result cache (serve/cache.py) in process: the LRU store, a miss then a hit through ResultCache,
the cache off, and the workload of `cxr bench cache`."""

from __future__ import annotations

import numpy as np
import pytest

from serve.cache import LruStore, ResultCache
from serve.schema import GateSettings
from tests.helpers import CACHE_FINGERPRINTS as FINGERPRINTS
from tests.helpers import RecordingMetrics as FakeMetrics
from tests.helpers import router_answer as answer
from tests.helpers import run_async as run

SETTINGS = GateSettings(w_cnn=0.4, threshold=0.85)


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


# ------------------------------------------------------------------------------------------- bench


def test_bench_workload_repeats_the_asked_share_of_requests():
    from serve.bench.result_cache import workload

    order = workload(100, 0.5)
    assert len(order) == 200 and sorted(set(order)) == list(range(100))
    assert list(dict.fromkeys(order)) == list(range(100))  # unseen images come in order
    assert workload(10, 0.0) == list(range(10)) and len(workload(1000, 0.5, max_requests=50)) == 50
    with pytest.raises(ValueError, match="repeat_fraction"):
        workload(10, 1.0)
