"""Application counters exported through Serve's Prometheus metrics (next to Serve's own request metrics).

Created in the router replica (``ServeMetrics()`` in its constructor), never at import time. Tags hold only the
endpoint, mode, status and rejection reason: nothing derived from an image.
"""

from __future__ import annotations

from ray.serve.metrics import Counter


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

    def answered(self, endpoint: str, mode: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "mode": mode, "status": str(status)})

    def rejected(self, reason: str) -> None:
        self.rejected_inputs.inc(tags={"reason": reason})

    def escalated(self) -> None:
        self.vit_escalations.inc()
