"""The ONNX Runtime backend of a model replica (``serve.<role>.backend: onnx``).

``OnnxRunner`` takes what ``serve.replicas.probabilities`` takes, uint8 ``[B, 1, S, S]``, and returns the same dict
(``{head: probabilities}``, float32, the heads and their sigmoid/softmax rebuilt from the label spaces in the file's
metadata). It runs on CPU with as many intra-op threads as the replica gives torch.
Before it serves, the file's metadata must match the checkpoint the replica loaded (arch, input size, mean/std,
label spaces, storage size): an export of another model fails the replica's start with the file and the field.

``backend_for_replica`` decides per replica: a replica that has a GPU stays on PyTorch (and says so in its log).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import file_sha256
from models.onnx_export import (
    OnnxMetadataError,
    build_metadata,
    check_metadata,
    metadata_label_spaces,
    onnx_logits,
    ort_session,
    probabilities_from_logits,
)

log = logging.getLogger(__name__)


class OnnxRunner:
    """One ONNX Runtime session over an exported model; ``runner(batch) -> {head: probabilities}``."""

    def __init__(self, path: str | Path, threads: int) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} not found (serve.<role>.onnx_model or `cxr export`)")
        self.session = ort_session(self.path, threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.label_spaces = metadata_label_spaces(self.path, self.metadata)
        self.sha256 = file_sha256(self.path)
        self.threads = threads

    def verify(self, payload: dict[str, Any], storage_size: int | None) -> None:
        """Raise ``OnnxMetadataError`` unless this file was exported from a model like ``payload``'s."""
        expected = build_metadata(payload, "", storage_size)
        check_metadata(self.path, self.metadata, expected)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return probabilities_from_logits(onnx_logits(self.session, batch), self.label_spaces)

    def info(self) -> dict[str, Any]:
        return {
            "backend": "onnx",
            "onnx_model": str(self.path),
            "onnx_sha256": self.sha256,
            "onnx_quantize": self.metadata.get("quantize", "none"),
        }


def backend_for_replica(
    source: dict[str, Any], payload: dict[str, Any], storage_size: int, device: Any, threads: int
) -> tuple[OnnxRunner | None, dict[str, Any]]:
    """(runner or None for PyTorch, the keys the replica adds to its ``info``) for ``source["backend"]``."""
    role = source.get("role", "?")
    if source.get("backend", "torch") != "onnx":
        return None, {"backend": "torch"}
    if getattr(device, "type", str(device)) != "cpu":
        log.info("%s: serve.%s.backend is onnx but this replica has %s: it stays on PyTorch", role, role, device)
        return None, {"backend": "torch", "onnx_skipped": f"replica on {device}"}
    if not source.get("onnx_model"):
        raise OnnxMetadataError(f"{role}: backend onnx but the source names no onnx_model")
    runner = OnnxRunner(source["onnx_model"], threads)
    runner.verify(payload, storage_size)
    log.info(
        "%s: ONNX Runtime on %d thread(s): %s (%s, sha256 %s)",
        role,
        threads,
        runner.path,
        runner.metadata.get("quantize", "none"),
        runner.sha256[:12],
    )
    return runner, runner.info()
