"""One image through the ensemble: preprocess once per input size, ask the CNN, gate, ask the ViT only if needed.

The gate and the fusion are ``models.ensemble.needs_vit`` and ``fuse``, the same functions evaluation and tuning
use, over the heads of the checkpoints the replicas serve (their label spaces, from ``describe()``): every head is
answered, and the gate scores the heads the caller reads. Model replicas are reached through ``DeploymentHandle``s;
their facts (label spaces, preprocessing, the weights' fingerprint) are asked for once and kept until a prediction
comes back with another fingerprint (a replica that came back with other weights) or, for the result
cache's keys, until they are ``FINGERPRINT_MAX_AGE_S`` old. The request's patient metadata row travels to every
replica with the image; a replica whose model has no fusion head ignores it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from models.calibration import calibrate
from models.checkpoint import PreprocessSpec
from models.ensemble import confidence, fuse, needs_vit
from models.explain import fuse_maps
from models.labels import LabelSpace, by_head, spaces_from_dicts
from serve.preprocess import Preprocessor
from serve.schema import GateSettings

ROLES = ("cnn", "vit")
FINGERPRINT_MAX_AGE_S = 1.0  # the cache's view of which weights serve: re-asked when older than this


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
        self.described_at: dict[str, float] = {}  # role -> time.monotonic() of its info; absent: ask again
        self._describing: dict[str, asyncio.Future] = {}  # one describe call in flight per role, shared
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

    async def describe(
        self, role: str, timeout_s: float | None = None, max_age_s: float | None = None
    ) -> dict[str, Any]:
        """The role's facts, asked again when never asked, forgotten by ``_answered_by`` or older than ``max_age_s``."""
        asked = self.described_at.get(role)
        if asked is None or (max_age_s is not None and time.monotonic() - asked > max_age_s):
            if role not in self._describing:  # concurrent requests share one call
                self._describing[role] = asyncio.ensure_future(self._ask_describe(role, timeout_s))
                self._describing[role].add_done_callback(lambda _: self._describing.pop(role, None))
            await asyncio.shield(self._describing[role])
        return self.info[role]

    async def _ask_describe(self, role: str, timeout_s: float | None) -> None:
        self.info[role] = await self.call(role, "describe", timeout_s=timeout_s)
        self.described_at[role] = time.monotonic()

    async def label_spaces(self, role: str, timeout_s: float | None = None) -> tuple[LabelSpace, ...]:
        """The heads the role's checkpoint has, in order (from its ``describe()``)."""
        return spaces_from_dicts((await self.describe(role, timeout_s))["label_spaces"])

    def _fusable(self) -> None:
        """CNN and ViT answers are fused head by head: both checkpoints must have the same label spaces."""
        cnn, vit = (self.info.get(role, {}).get("label_spaces") for role in ROLES)
        if cnn != vit:
            heads = {role: [space["head"] for space in self.info[role]["label_spaces"]] for role in ROLES}
            raise ModelUnavailable(
                "label_spaces_differ", f"the cnn and vit checkpoints have other heads or classes ({heads}): no fusion"
            )

    def metadata_users(self, roles: list[str]) -> list[str]:
        """Of ``roles`` (the models that answered, so already described), those whose answers read the metadata."""
        return [role for role in roles if self.info.get(role, {}).get("metadata_fusion")]

    async def fingerprints(self, roles: tuple[str, ...], timeout_s: float | None = None) -> dict[str, str | None]:
        """The weights each role serves now (at most ``FINGERPRINT_MAX_AGE_S`` old), for the result cache's key."""
        infos = await asyncio.gather(
            *(self.describe(role, timeout_s, max_age_s=FINGERPRINT_MAX_AGE_S) for role in roles)
        )
        return {role: info.get("fingerprint") for role, info in zip(roles, infos, strict=True)}

    def _answered_by(self, role: str, fingerprint: str | None) -> None:
        """A replica answered with other weights than described: describe the role again on next use."""
        if fingerprint is not None and self.info.get(role, {}).get("fingerprint") != fingerprint:
            self.described_at.pop(role, None)

    async def model_input(self, role: str, gray: np.ndarray, cache: dict[PreprocessSpec, np.ndarray]) -> np.ndarray:
        """The role's input from the decoded image; roles with the same spec share one preprocessed array."""
        meta = await self.describe(role)
        spec = PreprocessSpec(meta["preprocessing"]["storage_size"], meta["preprocessing"]["input_size"])
        if spec not in cache:
            if spec not in self.preprocessors:
                self.preprocessors[spec] = Preprocessor(spec)
            cache[spec] = await asyncio.to_thread(self.preprocessors[spec], gray)
        return cache[spec]

    async def predict(
        self,
        role: str,
        gray: np.ndarray,
        cache: dict,
        timings: dict[str, float],
        answered: dict | None = None,
        metadata: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Probabilities per head; ``answered`` (if given) gets the answering replica's weights fingerprint;
        ``metadata``: the patient metadata row (``models.metadata.encode``), None when every field is missing."""
        started = time.perf_counter()
        image = await self.model_input(role, gray, cache)
        timings["preprocess_ms"] = timings.get("preprocess_ms", 0.0) + (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        # always two arguments: serve.batch refuses a batch whose requests pass different numbers of them
        probs = await self.call(role, "predict", image, metadata)
        timings[f"{role}_ms"] = (time.perf_counter() - started) * 1e3
        fingerprint = probs.pop("fingerprint", None)  # the replica's, next to the heads
        self._answered_by(role, fingerprint)
        if answered is not None:
            answered[role] = fingerprint
        return probs

    async def answer(
        self,
        gray: np.ndarray,
        mode: str,
        settings: GateSettings,
        heads: tuple[str, ...] | None = None,
        metadata: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Probabilities, the models used, the CNN's confidence, whether the gate escalated, timings and fingerprints.

        The gate scores the CNN on ``heads`` only (the heads the caller reads; None: every head), as evaluation and
        tuning score each image on its own dataset's head; every head is answered either way. ``metadata`` goes to
        every model asked (see ``predict``). Each model's probabilities are calibrated at ``settings.temperatures``
        (tune stage B's, from ensemble.yaml) before the gate reads them and before fusion."""

        async def ask(role: str, *args: Any) -> dict[str, Any]:  # the model's answer at its temperatures
            probs = await self.predict(role, *args, metadata=metadata)
            temperatures = settings.temperatures.get(role)
            return calibrate(probs, await self.label_spaces(role), temperatures) if temperatures else probs

        cache: dict[PreprocessSpec, np.ndarray] = {}
        timings: dict[str, float] = {}
        answered: dict[str, str | None] = {}  # role -> fingerprint of the replica that answered
        cnn_confidence = None
        escalated = False
        if mode == "vit":
            probs, used = await ask("vit", gray, cache, timings, answered), ["vit"]
        elif mode == "ensemble":
            p_cnn, p_vit = await asyncio.gather(
                ask("cnn", gray, cache, timings, answered), ask("vit", gray, cache, timings, answered)
            )
            self._fusable()
            probs, used = fuse(p_cnn, p_vit, settings.w_cnn), ["cnn", "vit"]
        else:
            p_cnn = await ask("cnn", gray, cache, timings, answered)
            probs, used = p_cnn, ["cnn"]
            if mode == "adaptive":
                batch, spaces, scored = await self._gated(p_cnn, heads)
                escalated = bool(needs_vit(batch, spaces, settings.threshold, scored)[0])
                if escalated:
                    p_vit = await ask("vit", gray, cache, timings, answered)
                    self._fusable()
                    probs, used = fuse(p_cnn, p_vit, settings.w_cnn), ["cnn", "vit"]
        if "cnn" in used:
            cnn_confidence = float(confidence(*await self._gated(p_cnn, heads))[0])
        return {
            "probs": probs,
            "models_used": used,
            "cnn_confidence": cnn_confidence,
            "escalated": escalated,
            "timings": timings,
            "fingerprints": answered,
        }

    async def answer_confidence(self, probs: dict[str, Any], heads: tuple[str, ...] | None) -> float:
        """The answer's confidence as the gate measures it (the lowest over ``heads``), for the referral floor."""
        return float(confidence(*await self._gated(probs, heads))[0])

    async def _gated(self, p_cnn: dict[str, Any], heads: tuple[str, ...] | None) -> tuple[dict, dict, dict]:
        """(the CNN's probabilities as a batch of one, its label spaces by head, the heads scored) for the gate."""
        spaces = by_head(await self.label_spaces("cnn"))
        batch = {head: np.asarray(values)[None] for head, values in p_cnn.items()}
        return batch, spaces, {head: np.array([heads is None or head in heads]) for head in batch}

    async def explain(
        self,
        gray: np.ndarray,
        roles: tuple[str, ...],
        head: str | None,
        target: str | None,
        w_cnn: float,
        method: str = "grad-cam",
        temperatures: dict[str, dict[str, float]] | None = None,
    ) -> dict[str, Any]:
        """The ``method`` map (Grad-CAM, or attention where every role has it) of ``target`` (default: the most
        probable label of ``head``; ``head`` None: the model's first head) from each role, fused for the ensemble
        with the gate's weight; also the model input the map belongs to, for the overlay. The target's probability
        is the answer's, as a prediction gives it: each role calibrated at its ``temperatures``, then fused."""
        from serve.explanations import check_method, resolve_head, target_index  # keeps Starlette out of here

        cache: dict[PreprocessSpec, np.ndarray] = {}
        timings: dict[str, float] = {}
        infos = await asyncio.gather(*(self.describe(role) for role in roles))
        check_method(method, dict(zip(roles, infos, strict=True)))
        if len(roles) == 2:
            self._fusable()
        spaces = spaces_from_dicts(infos[0]["label_spaces"])
        space = resolve_head(head, spaces)
        head = space.head
        probs = await asyncio.gather(*(self.predict(role, gray, cache, timings) for role in roles))
        probs = [
            calibrate(p, spaces, (temperatures or {}).get(role) or {}) for role, p in zip(roles, probs, strict=True)
        ]
        fused = fuse(probs[0], probs[1], w_cnn) if len(roles) == 2 else probs[0]
        if target is None:
            target = space.classes[int(np.argmax(fused[head]))]
        index = target_index(space, target)
        started = time.perf_counter()
        images = await asyncio.gather(*(self.model_input(role, gray, cache) for role in roles))
        found = await asyncio.gather(
            *(self.call(role, "explain", image, head, index, method) for role, image in zip(roles, images, strict=True))
        )
        timings["explain_ms"] = (time.perf_counter() - started) * 1e3
        cam = fuse_maps(found[0]["cam"], found[1]["cam"], w_cnn) if len(roles) == 2 else found[0]["cam"]
        return {
            "head": head,
            "target": target,
            "cam": cam,
            "probability": float(np.asarray(fused[head]).ravel()[index]),
            "methods": {role: item["method"] for role, item in zip(roles, found, strict=True)},
            "image": max(images, key=lambda image: image.shape[-1])[0],  # the larger input when sizes differ
            "timings": timings,
        }
