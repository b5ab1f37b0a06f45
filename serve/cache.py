"""The router's result cache: one answer per (decoded image, metadata, mode, gate, model weights), in process or in
Redis.

Key: sha256 over the decoded grayscale pixels (dtype, shape, bytes), the mode, the heads the gate scores, the gate's
``w_cnn`` and ``threshold``, the request's patient metadata as the fusion head reads it (``models.metadata.encode``;
a request without metadata keys as the all-missing row, which is what a fusion model is given) and the fingerprints
of every model that could answer in that mode (adaptive and ensemble: both). A fingerprint
(``models.checkpoint.model_fingerprint``) hashes the checkpoint file a replica actually loaded with its backend, so
two checkpoints that share a version string still differ, and a redeploy with other weights misses. A miss is
stored under the fingerprints the answering replicas report with their predictions, so an answer computed by one
set of weights is never filed under another's.

Value: what ``EnsemblePipeline.answer`` returns, minus timings (probabilities as lists, models used, CNN confidence,
escalated), not the response body. The body is rebuilt from it on every hit with the live settings, so the finding
thresholds (a reconfigure of ``finding_threshold(s)``), labels, versions, input facts and latency are always this
request's; the finding thresholds therefore stay out of the key and cost no misses.

Stores: ``LruStore`` (an ``OrderedDict`` per router replica, ``max_entries``) or ``RedisStore`` (``redis.asyncio``,
JSON values under a versioned key prefix, ``ttl_s`` expiry, shared by every router replica). A Redis that fails
never fails a request: the request is answered uncached, the error counted, the outage logged once, and Redis is
left alone for ``RETRY_AFTER_S`` before the next try.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from serve.schema import GateSettings

log = logging.getLogger(__name__)

# Bump when the value layout changes, or when a key recipe change could make a new key equal an old one: old Redis
# entries are then never read. (Adding the metadata part needed no bump: keys hashed without it never match.)
SCHEMA_VERSION = 1
KEY_PREFIX = f"cxr:result:v{SCHEMA_VERSION}:"
REDIS_TIMEOUT_S = 0.25  # connect and per-command; Redis on the same network answers in well under a millisecond
RETRY_AFTER_S = 1.0  # after a failure, requests skip Redis this long instead of each paying a timeout
ROLES_BY_MODE = {"adaptive": ("cnn", "vit"), "ensemble": ("cnn", "vit"), "cnn": ("cnn",), "vit": ("vit",)}


class CacheStoreError(RuntimeError):
    """A store could not read or write (Redis down, timed out, or an unreadable entry)."""


# ------------------------------------------------------------------------------------------ fingerprints, keys


def roles_for(mode: str) -> tuple[str, ...]:
    """The models that could answer a request in ``mode`` (adaptive: the ViT too, if the gate escalates)."""
    try:
        return ROLES_BY_MODE[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(ROLES_BY_MODE)}") from None


def image_digest(gray: np.ndarray) -> str:
    """sha256 of the decoded pixels with their dtype and shape (the same pixels from a PNG or a DICOM agree)."""
    pixels = np.ascontiguousarray(gray)
    digest = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(memoryview(pixels).cast("B"))
    return digest.hexdigest()


def metadata_part(metadata: np.ndarray | None) -> list[float]:
    """The key's metadata part: the encoded row (None: every field missing). Keyed by the encoding rather than the
    raw fields, so values the model cannot tell apart (age "58" in a form, "058Y" in a DICOM header) share an entry.
    Models without the fusion head ignore it, and pay only misses for the same image under other metadata."""
    from models.metadata import encode  # the router's process already has torch; keeps import of this module light

    row = encode() if metadata is None else np.asarray(metadata, np.float32).reshape(-1)
    return [float(value) for value in row]


def cache_key(
    digest: str,
    mode: str,
    heads: tuple[str, ...],
    settings: GateSettings,
    fingerprints: dict[str, str],
    metadata: np.ndarray | None = None,
) -> str:
    """The entry's key; every argument that can change ``EnsemblePipeline.answer`` is in it."""
    missing = [role for role in roles_for(mode) if not fingerprints.get(role)]
    if missing:
        raise ValueError(f"no fingerprint for {missing}: a key without them could serve another model's answer")
    parts = {
        "image": digest,
        "mode": mode,
        "heads": list(heads),
        "w_cnn": float(settings.w_cnn),
        "threshold": float(settings.threshold),
        "temperatures": {role: settings.temperatures.get(role, {}) for role in roles_for(mode)},
        "models": {role: fingerprints[role] for role in roles_for(mode)},
        "metadata": metadata_part(metadata),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_value(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of an answer worth keeping: everything but the timings and the fingerprints."""
    return {
        "probs": {head: [float(p) for p in np.asarray(values).ravel()] for head, values in result["probs"].items()},
        "models_used": list(result["models_used"]),
        "cnn_confidence": result["cnn_confidence"],
        "escalated": bool(result["escalated"]),
    }


# ------------------------------------------------------------------------------------------ stores


class ResultStore(Protocol):
    name: str

    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def put(self, key: str, value: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class LruStore:
    """In-process, least recently used first out once ``max_entries`` are held; a get refreshes an entry."""

    name = "lru"

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Oldest (next to go) first."""
        return list(self._entries)

    async def get(self, key: str) -> dict[str, Any] | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: dict[str, Any]) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        return {"store": self.name, "entries": len(self._entries), "max_entries": self.max_entries}


def redacted(url: str) -> str:
    """The URL without its user and password (for /v1/model and logs)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


class RedisStore:
    """JSON values under ``KEY_PREFIX`` with a TTL; every failure becomes ``CacheStoreError``."""

    name = "redis"

    def __init__(self, url: str, ttl_s: float, timeout_s: float = REDIS_TIMEOUT_S) -> None:
        from redis.asyncio import Redis  # only routers configured for Redis import the client
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url, self.ttl_ms = url, max(1, round(ttl_s * 1000))
        # no client-side retries: ResultCache decides when to try again, and a request never waits on backoff
        self._client = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._call("GET", self._client.get(KEY_PREFIX + key))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as err:
            raise CacheStoreError(f"unreadable entry under {KEY_PREFIX}{key[:12]}...: {err}") from None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        await self._call("SET", self._client.set(KEY_PREFIX + key, json.dumps(value), px=self.ttl_ms))

    async def _call(self, command: str, awaitable: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await awaitable
        except (RedisError, OSError, asyncio.TimeoutError) as err:
            raise CacheStoreError(f"redis {command} at {redacted(self.url)} failed: {type(err).__name__}") from err

    async def close(self) -> None:
        await self._client.aclose()

    def describe(self) -> dict[str, Any]:
        return {"store": self.name, "url": redacted(self.url), "ttl_s": self.ttl_ms / 1000, "key_prefix": KEY_PREFIX}


# ------------------------------------------------------------------------------------------ the router's side


class CacheMetrics(Protocol):
    def cache_hit(self, store: str) -> None: ...

    def cache_miss(self, store: str) -> None: ...

    def cache_error(self, store: str, operation: str) -> None: ...


@dataclass
class Lookup:
    """One request's trip to the cache: the key parts (reused to store a miss) and the entry, if one was found."""

    digest: str | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)
    metadata: np.ndarray | None = None  # the request's metadata row, keyed again when a miss is stored
    value: dict[str, Any] | None = None

    @property
    def hit(self) -> bool:
        return self.value is not None


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0


class ResultCache:
    """Lookup before the pipeline, remember after it; counts, and rides out a failing store."""

    def __init__(self, store: ResultStore | None, metrics: CacheMetrics | None = None) -> None:
        self.store, self.metrics = store, metrics
        self.stats = CacheStats()
        self._down_since: float | None = None
        self._retry_at = 0.0

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, metrics: CacheMetrics | None = None) -> ResultCache:
        """From ``serve.cache`` as a dict (``CacheConfig.model_dump()``); None or ``enabled: false``: no cache."""
        if not options or not options.get("enabled", False):
            return cls(None, metrics)
        if options.get("redis_url"):
            return cls(RedisStore(options["redis_url"], float(options["ttl_s"])), metrics)
        return cls(LruStore(int(options["max_entries"])), metrics)

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def marker(self, lookup: Lookup) -> dict[str, Any]:
        """The response's ``cache`` field."""
        return {"hit": lookup.hit, "store": self.store.name if self.store is not None else None}

    async def lookup(
        self,
        gray: np.ndarray,
        mode: str,
        heads: tuple[str, ...],
        settings: GateSettings,
        fingerprints: dict[str, str],
        metadata: np.ndarray | None = None,
    ) -> Lookup:
        """The entry for this request, if any; ``fingerprints`` are those of the models that could answer,
        ``metadata`` the request's encoded patient metadata (None: all missing)."""
        if self.store is None or any(not fingerprints.get(role) for role in roles_for(mode)):
            return Lookup()
        lookup = Lookup(await asyncio.to_thread(image_digest, gray), dict(fingerprints), metadata=metadata)
        if self._resting():
            return lookup
        key = cache_key(lookup.digest, mode, heads, settings, lookup.fingerprints, lookup.metadata)
        try:
            lookup.value = await self.store.get(key)
        except CacheStoreError as err:
            self._failed("get", err)
            return lookup
        self._succeeded()
        self._count(lookup.hit)
        return lookup

    async def remember(
        self, lookup: Lookup, mode: str, heads: tuple[str, ...], settings: GateSettings, result: dict[str, Any]
    ) -> None:
        """Store a fresh answer under the fingerprints of the replicas that computed it."""
        if self.store is None or lookup.digest is None or self._resting():
            return
        fingerprints = {**lookup.fingerprints, **{k: v for k, v in result.get("fingerprints", {}).items() if v}}
        key = cache_key(lookup.digest, mode, heads, settings, fingerprints, lookup.metadata)
        try:
            await self.store.put(key, cache_value(result))
        except CacheStoreError as err:
            self._failed("put", err)
            return
        self._succeeded()

    def describe(self) -> dict[str, Any]:
        """For /v1/model: the store's settings and this router replica's counts."""
        if self.store is None:
            return {"enabled": False}
        return {
            "enabled": True,
            **self.store.describe(),
            "available": self._down_since is None,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "errors": self.stats.errors,
        }

    # ---------------------------------------------------------------------------------------- bookkeeping

    def _count(self, hit: bool) -> None:
        assert self.store is not None
        if hit:
            self.stats.hits += 1
            if self.metrics:
                self.metrics.cache_hit(self.store.name)
        else:
            self.stats.misses += 1
            if self.metrics:
                self.metrics.cache_miss(self.store.name)

    def _resting(self) -> bool:
        """True while a failed store is left alone (requests go uncached without waiting on it)."""
        return self._down_since is not None and time.monotonic() < self._retry_at

    def _failed(self, operation: str, err: CacheStoreError) -> None:
        assert self.store is not None
        self.stats.errors += 1
        if self.metrics:
            self.metrics.cache_error(self.store.name, operation)
        now = time.monotonic()
        if self._down_since is None:  # once per outage
            log.warning("result cache unavailable (%s); answering uncached until it is back", err)
            self._down_since = now
        self._retry_at = now + RETRY_AFTER_S

    def _succeeded(self) -> None:
        if self._down_since is not None:
            log.warning("result cache back after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
