"""One image through the ensemble: preprocess once per input size, ask the CNN, gate, ask the ViT only if needed.

The gate and the fusion are ``models.ensemble.needs_vit`` and ``fuse``, the same functions evaluation and tuning
use. Model replicas are reached through ``DeploymentHandle``s; their facts (label spaces, preprocessing) are asked
for once and cached, since a replica restarted by Serve serves the same checkpoint.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from models.ensemble import HEADS, confidence, fuse, needs_vit
from serve.preprocess import Preprocessor, PreprocessSpec
from serve.schema import GateSettings

ROLES = ("cnn", "vit")


class ModelUnavailable(RuntimeError):
    """A model replica could not answer in time or at all: the request gets 503 with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class EnsemblePipeline:
    def __init__(self, handles: dict[str, Any], timeout_s: float) -> None:
        self.handles = handles
        self.timeout_s = timeout_s
        self.info: dict[str, dict[str, Any]] = {}
        self.preprocessors: dict[PreprocessSpec, Preprocessor] = {}

    async def call(self, role: str, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """A handle call with a deadline; Serve's and Ray's failures become ``ModelUnavailable``."""
        response = getattr(self.handles[role], method).remote(*args)
        try:
            return await asyncio.wait_for(response, timeout_s or self.timeout_s)
        except BackPressureError as err:
            raise ModelUnavailable("overloaded", f"the {role} queue is full") from err
        except asyncio.TimeoutError as err:
            response.cancel()
            limit = timeout_s or self.timeout_s
            raise ModelUnavailable("model_timeout", f"the {role} did not answer within {limit}s") from err
        except (DeploymentUnavailableError, RayActorError, RayServeException) as err:
            raise ModelUnavailable("model_unavailable", f"the {role} failed: {type(err).__name__}") from err

    async def describe(self, role: str, timeout_s: float | None = None) -> dict[str, Any]:
        if role not in self.info:
            self.info[role] = await self.call(role, "describe", timeout_s=timeout_s)
        return self.info[role]

    async def model_input(self, role: str, gray: np.ndarray, cache: dict[PreprocessSpec, np.ndarray]) -> np.ndarray:
        """The role's input from the decoded image; roles with the same spec share one preprocessed array."""
        meta = await self.describe(role)
        spec = PreprocessSpec(meta["preprocessing"]["storage_size"], meta["preprocessing"]["input_size"])
        if spec not in cache:
            if spec not in self.preprocessors:
                self.preprocessors[spec] = Preprocessor(spec)
            cache[spec] = await asyncio.to_thread(self.preprocessors[spec], gray)
        return cache[spec]

    async def predict(self, role: str, gray: np.ndarray, cache: dict, timings: dict[str, float]) -> dict[str, Any]:
        started = time.perf_counter()
        image = await self.model_input(role, gray, cache)
        timings["preprocess_ms"] = timings.get("preprocess_ms", 0.0) + (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        probs = await self.call(role, "predict", image)
        timings[f"{role}_ms"] = (time.perf_counter() - started) * 1e3
        return probs

    async def answer(
        self, gray: np.ndarray, mode: str, settings: GateSettings, heads: tuple[str, ...] = HEADS
    ) -> dict[str, Any]:
        """Probabilities, the models used, the CNN's confidence and whether the gate escalated, with timings.

        The gate scores the CNN on ``heads`` only (the heads the caller reads), as evaluation and tuning score
        each image on its own dataset's head; both heads are answered either way."""
        scored = {head: np.array([head in heads]) for head in HEADS}
        cache: dict[PreprocessSpec, np.ndarray] = {}
        timings: dict[str, float] = {}
        cnn_confidence = None
        escalated = False
        if mode == "vit":
            probs, used = await self.predict("vit", gray, cache, timings), ["vit"]
        elif mode == "ensemble":
            p_cnn, p_vit = await asyncio.gather(
                self.predict("cnn", gray, cache, timings), self.predict("vit", gray, cache, timings)
            )
            probs, used = fuse(p_cnn, p_vit, settings.w_cnn), ["cnn", "vit"]
        else:
            p_cnn = await self.predict("cnn", gray, cache, timings)
            probs, used = p_cnn, ["cnn"]
            if mode == "adaptive":
                batch = {head: np.asarray(values)[None] for head, values in p_cnn.items()}
                escalated = bool(needs_vit(batch, settings.threshold, scored)[0])
                if escalated:
                    p_vit = await self.predict("vit", gray, cache, timings)
                    probs, used = fuse(p_cnn, p_vit, settings.w_cnn), ["cnn", "vit"]
        if "cnn" in used:
            cnn_confidence = float(confidence({h: np.asarray(v)[None] for h, v in p_cnn.items()}, scored)[0])
        return {
            "probs": probs,
            "models_used": used,
            "cnn_confidence": cnn_confidence,
            "escalated": escalated,
            "timings": timings,
        }
