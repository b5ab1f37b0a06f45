"""Application counters exported through Serve's Prometheus metrics (next to Serve's own request metrics).

Created in the router replica (``ServeMetrics()`` in its constructor), never at import time. Tags hold only the
endpoint, mode, status, rejection reason and cache store: nothing derived from an image.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

# out-of-distribution scores: about 3 at the training images' 99th percentiles; non-radiographs score far higher
OOD_SCORE_BOUNDARIES = [1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 25.0, 50.0, 100.0, 1000.0]


class ServeMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "cxr_requests",
            description="Images answered or refused, by endpoint, mode and HTTP status.",
            tag_keys=("endpoint", "mode", "status"),
        )
        self.vit_escalations = Counter(
            "cxr_vit_escalations",
            description="Adaptive requests whose CNN confidence was below the gate, so the ViT was called.",
        )
        self.rejected_inputs = Counter(
            "cxr_rejected_inputs",
            description="Uploads refused before inference, by reason (too_large, unsupported_type, corrupt, ...).",
            tag_keys=("reason",),
        )
        self.cache_hits = Counter(
            "cxr_cache_hits",
            description="Images answered from the result cache, by store (lru or redis).",
            tag_keys=("store",),
        )
        self.cache_misses = Counter(
            "cxr_cache_misses",
            description="Cache lookups that found no entry (the models answered), by store.",
            tag_keys=("store",),
        )
        self.cache_errors = Counter(
            "cxr_cache_errors",
            description="Result cache reads or writes that failed (the request went uncached), by store and op.",
            tag_keys=("store", "operation"),
        )

        self.ood_scores = Histogram(
            "cxr_ood_score",
            description="Out-of-distribution score of every scored image (refused past the check's threshold).",
            boundaries=OOD_SCORE_BOUNDARIES,
        )

    def answered(self, endpoint: str, mode: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "mode": mode, "status": str(status)})

    def rejected(self, reason: str) -> None:
        self.rejected_inputs.inc(tags={"reason": reason})

    def ood_scored(self, score: float) -> None:
        self.ood_scores.observe(score)

    def escalated(self) -> None:
        self.vit_escalations.inc()

    def cache_hit(self, store: str) -> None:
        self.cache_hits.inc(tags={"store": store})

    def cache_miss(self, store: str) -> None:
        self.cache_misses.inc(tags={"store": store})

    def cache_error(self, store: str, operation: str) -> None:
        self.cache_errors.inc(tags={"store": store, "operation": operation})
