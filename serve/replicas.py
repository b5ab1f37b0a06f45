"""The CNN and ViT model deployments: one network per replica, requests batched with ``@serve.batch``.

A replica takes preprocessed uint8 images ``[1, S, S]`` (the router decodes and preprocesses once), each with its
patient metadata row (``models.metadata.FEATURES``, float32, or None: all missing), and returns
probabilities for every head of the checkpoint (``{head: probs}``, each sigmoid or softmax as its label space says)
as numpy arrays, plus ``"fingerprint"``: the sha256 of the
weights it serves (``serve.cache.model_fingerprint``, also in ``describe()``), which keys the router's result cache.
The forward pass runs in a worker thread, so the replica's event loop keeps queueing the next batch meanwhile.
With ``serve.<role>.backend: onnx`` a CPU replica computes them with ONNX Runtime (``serve/onnx_backend.py``).

Only a model with the fusion head (``model.uses_metadata``) is given the metadata, as a ``[B, 8]`` tensor; others
are called with images alone, as before. The ONNX export takes images only, so an ONNX replica of a fusion model
answers as if every field were missing, and says so: ``describe()["metadata_fusion"]`` is false there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

log = logging.getLogger(__name__)

# Defaults only: __init__ sets the configured size and wait on the batch queue before the first request.
DEFAULT_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.0


class ModelReplica:
    """One network (CNN or ViT) loaded from a source dict of ``serve.model_source.resolve_source``."""

    def __init__(self, source: dict[str, Any], batch_max_size: int, batch_wait_timeout_s: float, threads: int):
        import torch  # in the replica only: building the app must not load torch models

        from models.checkpoint import (
            CHECKPOINT_FILE,
            PreprocessSpec,
            load_checkpoint,
            model_fingerprint,
            model_from_checkpoint,
        )
        from models.explain import methods_for
        from serve.model_source import materialize
        from serve.onnx_backend import backend_for_replica

        torch.set_num_threads(threads)  # one thread per replica on small machines: two collapse under load
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        checkpoint_dir, facts = materialize(source)
        payload = load_checkpoint(checkpoint_dir)
        self.model = model_from_checkpoint(checkpoint_dir, payload).to(self.device)
        self.info = {
            "role": source["role"],
            "arch": payload["arch"],
            "version": source.get("version"),
            "checkpoint": str(checkpoint_dir),
            "registered_model": source.get("registered_model"),
            "mlflow_run_id": facts.get("mlflow_run_id"),
            "epoch": payload.get("epoch"),
            "metrics": {k: v if v == v else None for k, v in payload.get("metrics", {}).items()},  # NaN: no JSON
            "label_spaces": payload["label_spaces"],
            "preprocessing": {**payload["preprocessing"], **vars(PreprocessSpec.from_checkpoint_meta(payload))},
            "device": str(self.device),
            "explain_methods": list(methods_for(self.model)),
        }
        # backend onnx: ONNX Runtime answers predict on CPU replicas; self.model stays loaded (explain uses it)
        self._runner, backend_info = backend_for_replica(
            source, payload, self.info["preprocessing"]["storage_size"], self.device, threads
        )
        self.info.update(backend_info)
        fusion = bool(getattr(self.model, "uses_metadata", False))
        if fusion and self._runner is not None:
            log.warning("%s: the ONNX export takes images only: metadata is ignored", source["role"])
        # whether this replica's answers read the metadata (the router reports it as the answer's metadata.used_by)
        self.info["metadata_fusion"] = fusion and self._runner is None
        del payload  # the optimizer state is not needed to serve
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.predict.set_max_batch_size(batch_max_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # last, so every key of info (the backend's too) is set: the result cache keys answers by these weights
        self.info["fingerprint"] = model_fingerprint(Path(checkpoint_dir) / CHECKPOINT_FILE, self.info)
        log.info("%s replica ready: %s on %s (pid %d)", source["role"], self.info["version"], self.device, os.getpid())

    def describe(self) -> dict[str, Any]:
        """Model facts for /v1/model and the router's preprocessing; answered only once weights are loaded."""
        return self.info

    @serve.batch(max_batch_size=DEFAULT_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def predict(
        self, images: list[np.ndarray], metadata: list[np.ndarray | None] | None = None
    ) -> list[dict[str, Any]]:
        """One entry per request; ``metadata`` (one row or None per request, batched by ``serve.batch`` like the
        images) reaches the model only when it has the fusion head."""
        batch = np.stack(images)
        rows = metadata_batch(metadata, len(images)) if self.info["metadata_fusion"] else None
        probs = await asyncio.get_running_loop().run_in_executor(self._executor, self._forward, batch, rows)
        fingerprint = self.info["fingerprint"]  # which weights answered: the router keys its cache by it
        return [
            {**{head: values[i] for head, values in probs.items()}, "fingerprint": fingerprint}
            for i in range(len(images))
        ]

    def _forward(self, batch: np.ndarray, metadata: np.ndarray | None) -> dict[str, np.ndarray]:
        if self._runner is not None:
            return self._runner(batch)  # images only (see the module docstring)
        return probabilities(self.model, batch, self.device, metadata)

    async def explain(self, image: np.ndarray, head: str, target: int, method: str = "grad-cam") -> dict[str, Any]:
        """The ``method`` map (``info["explain_methods"]``) of one label for one preprocessed image; not batched (a
        backward pass per request), and on the same single forward thread as ``predict``, so the two never run the
        model at once."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._executor, self._explain, image, head, target, method)
        return {"cam": found.cam, "probability": found.probability, "method": found.method}

    def _explain(self, image: np.ndarray, head: str, target: int, method: str):
        from models.explain import explain

        return explain(self.model, image[None], head, target, method)[0]


def metadata_batch(metadata: list[np.ndarray | None] | None, size: int) -> np.ndarray:
    """float32 ``[size, len(FEATURES)]``: each request's row, the all-missing row for a request without one."""
    from models.metadata import encode

    rows = metadata if metadata is not None else [None] * size
    assert len(rows) == size, "serve.batch hands one metadata entry per image"
    missing = encode()
    return np.stack([missing if row is None else np.asarray(row, np.float32).reshape(-1) for row in rows])


def probabilities(model, batch: np.ndarray, device, metadata: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """uint8 [B, 1, S, S] (and, for a fusion model, metadata float32 [B, F]) -> {head: probabilities [B, K]} for
    every head of ``model`` (its label spaces' sigmoid or softmax), in head order; the benchmark's direct path too.
    ``metadata`` None: every field missing (the model's own default)."""
    import torch

    with torch.inference_mode():
        images = torch.from_numpy(batch).to(device, non_blocking=True)
        if metadata is None:
            logits = model(images)
        else:
            logits = model(images, torch.from_numpy(metadata).to(device, non_blocking=True))
        return {space.head: space.probabilities(logits[space.head]).cpu().numpy() for space in model.label_spaces}


def torch_threads(num_cpus: float) -> int:
    return max(1, math.floor(num_cpus))


CNNModel = serve.deployment(name="CNNModel")(ModelReplica)
ViTModel = serve.deployment(name="ViTModel")(ModelReplica)
