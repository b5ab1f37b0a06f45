"""``EnsembleRouter``: the HTTP ingress (a Starlette app inside a Serve deployment) in front of the two models.

Routes (JSON unless said):
    POST /v1/predict[?mode=adaptive|cnn|vit|ensemble][&head=HEAD][&ood=on|off]   one image: multipart or raw body
    POST /v1/predict/batch[?mode=...][&head=HEAD]       several file parts: one result or error per image, in order
    POST /v1/explain[?head=HEAD][&target=NAME][&model=cnn|vit|ensemble][&format=png][&method=grad-cam|attention]
                                                        Grad-CAM (or attention, for models that have it) of one
                                                        label: raw map + overlay PNG (or the PNG)
    GET  /                                              the upload page (serve/web/), its files under /static/
    GET  /v1/health                                     200 only when both models are loaded (never needs the key)
    GET  /v1/model                                      versions, checkpoints, label spaces, ensemble, cache settings

``HEAD`` is any head of the served checkpoints (their label spaces; ``GET /v1/model`` lists them): a prediction
answers every head, and ``?head=`` names the one the gate scores (default: all of them); an unknown head is 400
``bad_head`` naming the known ones. The answer's shape is ``serve.schema.prediction_body``.

Every decoded image is scored by stage B's out-of-distribution check (``serve/ood_gate.py``) before any model is
asked: past its threshold the image gets 422 ``not_a_chest_radiograph`` with its score (predict, batch and explain),
unless ``?ood=off``; the score is in every answer.

Predictions take optional patient metadata for models with the fusion head (``serve/metadata.py``): multipart form
fields or query parameters ``age``, ``sex`` (M|F), ``view_position`` (PA|AP), for every image of the request, else a
DICOM upload's header; an invalid field is 400 ``bad_metadata``. The answer's ``metadata`` says what was used.

The Starlette app is built per replica by ``__serve_build_asgi_app__`` (``serve.ingress()`` without an app), so
its routes close over this replica's handles and live gate settings. ``reconfigure`` takes the ``user_config``
(weights, threshold, finding thresholds) and swaps it atomically; model replicas are untouched.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.cache import Lookup, ResultCache, roles_for
from serve.explanations import ExplainQuery, map_json, overlay_png
from serve.inputs import InputLimits, InputRejected, decode_upload
from serve.metadata import PatientMetadata, decode_with_metadata, request_fields
from serve.metrics import ServeMetrics
from serve.ood_gate import OodGate
from serve.pipeline import ROLES, EnsemblePipeline, ModelUnavailable
from serve.schema import API_VERSION, MODES, GateSettings, error_body, prediction_body
from serve.uploads import Upload, read_request, read_uploads
from serve.web import web_routes

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 2.0


def _error(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse(error_body(status, reason, detail), status_code=status)


@serve.deployment(name="EnsembleRouter")
@serve.ingress()
class EnsembleRouter:
    def __init__(self, cnn: DeploymentHandle, vit: DeploymentHandle, options: dict[str, Any]) -> None:
        handles = {"cnn": cnn, "vit": vit}
        if options.get("grpc"):  # Serve's handle option for gRPC transport (its own flag sets the same default)
            handles = {role: handle.options(_by_reference=False) for role, handle in handles.items()}
        self.pipeline = EnsemblePipeline(handles, options["request_timeout_s"])
        self.limits = InputLimits.from_serve_config(
            options["max_upload_mb"], options["max_pixels"], options["dicom_modalities"]
        )
        self.max_batch_images = options["max_batch_images"]
        self.api_key = self._api_key(options.get("api_key_env"))
        self.settings = GateSettings.from_user_config(options["gate"])  # until the first reconfigure
        self.metrics = ServeMetrics()
        self.cache = ResultCache.from_options(options.get("cache"), self.metrics)  # serve.cache
        self.ood = OodGate(options.get("ood"), options.get("ood_enabled", True))  # stage B's check, if any

    @staticmethod
    def _api_key(env_name: str | None) -> str | None:
        if not env_name:
            return None
        key = os.environ.get(env_name)
        if not key:  # refuse to start open when the operator asked for a key
            raise RuntimeError(f"serve.api_key_env is {env_name!r} but that variable is empty in the router's env")
        return key

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.settings = GateSettings.from_user_config(user_config)
        log.info("gate settings now w_cnn=%s threshold=%s", self.settings.w_cnn, self.settings.threshold)

    def __serve_build_asgi_app__(self) -> Starlette:
        routes = [
            Route("/v1/predict", self.predict, methods=["POST"]),
            Route("/v1/predict/batch", self.predict_batch, methods=["POST"]),
            Route("/v1/health", self.health, methods=["GET"]),
            Route("/v1/model", self.model, methods=["GET"]),
            Route("/v1/explain", self.explain, methods=["POST"]),
            *web_routes(),
        ]
        return Starlette(routes=routes)

    # ------------------------------------------------------------------------------------------ checks

    def _unauthorised(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        given = request.headers.get("x-api-key") or ""
        bearer = request.headers.get("authorization", "")
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        if given and hmac.compare_digest(given.encode(), self.api_key.encode()):
            return None
        return _error(401, "unauthorized", "missing or wrong API key (header X-API-Key or Authorization: Bearer)")

    @staticmethod
    def _mode(request: Request) -> str:
        mode = request.query_params.get("mode", "adaptive")
        if mode not in MODES:
            raise InputRejected(400, "bad_mode", f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        return mode

    async def _gate_heads(self, request: Request, mode: str) -> tuple[str, ...]:
        """The heads the caller will read (``?head=``), which the gate scores: every head of the model that answers
        first in ``mode`` unless one is named."""
        spaces = await self.pipeline.label_spaces(roles_for(mode)[0])
        known = tuple(space.head for space in spaces)
        head = request.query_params.get("head")
        if head is None:
            return known
        if head not in known:
            raise InputRejected(
                400, "bad_head", f"head must be one of the model's heads ({', '.join(known)}), got {head!r}"
            )
        return (head,)

    # ------------------------------------------------------------------------------------------ routes

    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        mode = request.query_params.get("mode", "adaptive")
        if denied := self._unauthorised(request):
            self.metrics.answered("predict", mode, 401)
            return denied
        try:
            mode = self._mode(request)
            heads = await self._gate_heads(request, mode)
            check_ood = self.ood.requested(request.query_params)
            uploads, form = await read_request(request, self.limits.max_bytes, 1)
            explicit = request_fields(form, request.query_params)
            status, body = await self._answer_one(uploads[0], mode, heads, started, explicit, check_ood)
        except InputRejected as err:
            self.metrics.rejected(err.reason)
            status, body = err.status, err.as_json()
        except ModelUnavailable as err:
            status, body = 503, error_body(503, err.reason, err.detail)
        self.metrics.answered("predict", mode, status)
        return JSONResponse(body, status_code=status)

    async def predict_batch(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        mode = request.query_params.get("mode", "adaptive")
        if denied := self._unauthorised(request):
            self.metrics.answered("batch", mode, 401)
            return denied
        try:
            mode = self._mode(request)
            heads = await self._gate_heads(request, mode)
            check_ood = self.ood.requested(request.query_params)
            if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                raise InputRejected(400, "expected_multipart", "send the images as file parts of multipart/form-data")
            uploads, form = await read_request(request, self.limits.max_bytes, self.max_batch_images)
            explicit = request_fields(form, request.query_params)  # for every image of the request
        except InputRejected as err:
            self.metrics.rejected(err.reason)
            self.metrics.answered("batch", mode, err.status)
            return JSONResponse(err.as_json(), status_code=err.status)
        except ModelUnavailable as err:
            self.metrics.answered("batch", mode, 503)
            return _error(503, err.reason, err.detail)
        answers = await asyncio.gather(
            *(self._answer_one(upload, mode, heads, started, explicit, check_ood) for upload in uploads)
        )
        results = []
        for index, (upload, (status, body)) in enumerate(zip(uploads, answers, strict=True)):
            self.metrics.answered("batch", mode, status)
            results.append({"index": index, "filename": upload.filename, "status": status, **body})
        elapsed_ms = (time.perf_counter() - started) * 1e3
        return JSONResponse({"api_version": API_VERSION, "mode": mode, "results": results, "latency_ms": elapsed_ms})

    def _decode_and_score(self, data: bytes, explicit: dict[str, Any]) -> tuple:
        """In one worker thread: the decoded image, its format and metadata, and its out-of-distribution score."""
        gray, image_format, metadata = decode_with_metadata(data, self.limits, explicit)
        return gray, image_format, metadata, self.ood.score(gray)

    async def _answer_one(
        self,
        upload: Upload,
        mode: str,
        heads: tuple[str, ...],
        started: float,
        explicit: dict[str, Any],
        check_ood: bool = True,
    ) -> tuple[int, dict[str, Any]]:
        """(status, body) for one image; never raises on input, so a batch answers every image. ``explicit``: the
        request's validated metadata fields (``serve.metadata.request_fields``); a DICOM header fills the rest.
        ``check_ood``: the request's ``?ood=`` (off: a non-radiograph is answered, not refused)."""
        settings = self.settings  # one consistent snapshot even if reconfigure lands mid-request
        try:
            if upload.rejected is not None:
                raise upload.rejected
            decode_started = time.perf_counter()
            gray, image_format, metadata, score = await asyncio.to_thread(self._decode_and_score, upload.data, explicit)
            decode_ms = (time.perf_counter() - decode_started) * 1e3
            ood = self.ood.verdict(score, check_ood)
            if ood is not None:
                self.metrics.ood_scored(ood["score"])
                if ood["refused"]:
                    self.metrics.rejected(OodGate.REASON)
                    return 422, self.ood.refusal(ood)
            result, cached = await self._cached_answer(gray, mode, heads, settings, metadata)
        except InputRejected as err:
            self.metrics.rejected(err.reason)
            return err.status, err.as_json()
        except ModelUnavailable as err:
            return 503, error_body(503, err.reason, err.detail)
        except Exception as err:  # the router must not fall over on anything an input triggers
            log.error("unexpected %s while answering a request", type(err).__name__)  # no image content logged
            return 500, error_body(500, "internal", type(err).__name__)
        if result["escalated"] and not cached.hit:  # a cached answer called no ViT
            self.metrics.escalated()
        spaces = await self.pipeline.label_spaces(result["models_used"][0])
        # the answer's own confidence (on the heads the caller reads) against stage B's floor: below it, refer
        answer_confidence = await self.pipeline.answer_confidence(result["probs"], heads)
        refer = answer_confidence < settings.refer_below
        body = {
            "api_version": API_VERSION,
            "mode": mode,
            **prediction_body(result["probs"], spaces, settings),
            "cnn_confidence": result["cnn_confidence"],
            "models_used": result["models_used"],
            "gate": {
                "threshold": settings.threshold,
                "w_cnn": settings.w_cnn,
                "heads": list(heads),
                "escalated": result["escalated"],
            },
            "ood": None if ood is None else {key: ood[key] for key in ("score", "threshold", "checked")},
            "refer": refer,
            "refer_reason": (
                f"the answer's confidence on {', '.join(heads)} ({answer_confidence:.3f}) is below the referral "
                f"floor {settings.refer_below:.3f}: have a radiologist read this image"
                if refer
                else None
            ),
            "model_versions": {role: self.pipeline.info[role]["version"] for role in result["models_used"]},
            "input": {"format": image_format, "width": int(gray.shape[1]), "height": int(gray.shape[0])},
            "metadata": metadata.as_json(self.pipeline.metadata_users(result["models_used"])),
            "cache": self.cache.marker(cached),
            "latency_ms": {
                "total": (time.perf_counter() - started) * 1e3,
                "decode": decode_ms,
                **{k.removesuffix("_ms"): v for k, v in result.get("timings", {}).items()},
            },
        }
        return 200, body

    async def _cached_answer(
        self,
        gray: Any,
        mode: str,
        heads: tuple[str, ...],
        settings: GateSettings,
        metadata: PatientMetadata | None = None,
    ) -> tuple[dict[str, Any], Lookup]:
        """The pipeline's answer, from the result cache when it holds one for these pixels, metadata (None: every
        field missing), weights and gate."""
        vector = metadata.vector() if metadata is not None else None
        fingerprints: dict[str, str | None] = {}
        if self.cache.enabled:
            try:
                fingerprints = await self.pipeline.fingerprints(roles_for(mode), HEALTH_TIMEOUT_S)
            except ModelUnavailable:  # e.g. the ViT is down: an adaptive request the CNN settles still succeeds
                fingerprints = {}  # unknown weights: answered uncached
        lookup = await self.cache.lookup(gray, mode, heads, settings, fingerprints, vector)
        if lookup.value is not None:
            return lookup.value, lookup
        result = await self.pipeline.answer(gray, mode, settings, heads, vector)
        await self.cache.remember(lookup, mode, heads, settings, result)
        return result, lookup

    async def explain(self, request: Request) -> Response:
        """Grad-CAM of one label: JSON with the raw map and a base64 overlay PNG, or the PNG (``format=png``)."""
        started = time.perf_counter()
        model = request.query_params.get("model", "cnn")
        if denied := self._unauthorised(request):
            self.metrics.answered("explain", model, 401)
            return denied
        settings = self.settings
        try:
            query = ExplainQuery.from_params(request.query_params)
            check_ood = self.ood.requested(request.query_params)
            upload = (await read_uploads(request, self.limits.max_bytes, 1))[0]
            if upload.rejected is not None:
                raise upload.rejected
            gray, image_format = await asyncio.to_thread(decode_upload, upload.data, self.limits)
            ood = self.ood.verdict(await asyncio.to_thread(self.ood.score, gray), check_ood)
            if ood is not None and ood["refused"]:  # no map of what the models never learned to read
                self.metrics.rejected(OodGate.REASON)
                self.metrics.answered("explain", model, 422)
                return JSONResponse(self.ood.refusal(ood), status_code=422)
            found = await self.pipeline.explain(
                gray, query.roles, query.head, query.target, settings.w_cnn, query.method, settings.temperatures
            )
            png = await asyncio.to_thread(overlay_png, found["image"], found["cam"])
        except InputRejected as err:
            self.metrics.rejected(err.reason)
            self.metrics.answered("explain", model, err.status)
            return JSONResponse(err.as_json(), status_code=err.status)
        except ModelUnavailable as err:
            self.metrics.answered("explain", model, 503)
            return _error(503, err.reason, err.detail)
        except Exception as err:  # as in predict: no input may take the router down
            log.error("unexpected %s while explaining a request", type(err).__name__)
            self.metrics.answered("explain", model, 500)
            return _error(500, "internal", type(err).__name__)
        self.metrics.answered("explain", model, 200)
        if query.format == "png":
            return Response(png, media_type="image/png")
        body = {
            "api_version": API_VERSION,
            "head": found["head"],
            "target": found["target"],
            "model": query.model,
            "probability": found["probability"],
            "method": found["methods"],
            "map": map_json(found["cam"]),
            "overlay_png": base64.b64encode(png).decode("ascii"),
            "model_versions": {role: self.pipeline.info[role]["version"] for role in query.roles},
            "input": {"format": image_format, "width": int(gray.shape[1]), "height": int(gray.shape[0])},
            "latency_ms": {
                "total": (time.perf_counter() - started) * 1e3,
                **{k.removesuffix("_ms"): v for k, v in found["timings"].items()},
            },
        }
        return JSONResponse(body)

    async def health(self, request: Request) -> JSONResponse:
        states = await asyncio.gather(*(self._model_state(role) for role in ROLES))
        models = dict(zip(ROLES, states, strict=True))
        ready = all(state == "ready" for state in states)
        return JSONResponse({"status": "ready" if ready else "not_ready", "models": models}, 200 if ready else 503)

    async def _model_state(self, role: str) -> str:
        try:
            await self.pipeline.call(role, "describe", timeout_s=HEALTH_TIMEOUT_S)
        except ModelUnavailable as err:
            return err.reason
        return "ready"

    async def model(self, request: Request) -> JSONResponse:
        if denied := self._unauthorised(request):
            return denied
        models = {}
        for role in ROLES:
            try:
                models[role] = await self.pipeline.describe(role, timeout_s=HEALTH_TIMEOUT_S)
            except ModelUnavailable as err:
                models[role] = {"status": err.reason}
        body = {
            "api_version": API_VERSION,
            "models": models,
            "ensemble": self.settings.as_dict(),
            "ood": self.ood.describe(),
            "cache": self.cache.describe(),
            "modes": list(MODES),
            "limits": {
                "max_upload_bytes": self.limits.max_bytes,
                "max_pixels": self.limits.max_pixels,
                "max_batch_images": self.max_batch_images,
                "dicom_modalities": sorted(self.limits.dicom_modalities),
            },
        }
        return JSONResponse(body)
