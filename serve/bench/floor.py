"""Ray Serve's own cost per request in the app's topology with no work in it: the floor under `cxr bench serve`.

HTTP proxy -> an ingress replica that reads the body -> one handle call to a second replica that answers at once
-> a small JSON response. Resources and limits are the app's router and CNN settings, so ``serve cnn`` minus this
floor minus the in-process call is what the app's own code (decode, preprocess, gate, response) adds.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipelines.config import Config


@serve.deployment(name="FloorModel")
class FloorModel:
    async def predict(self, size: int) -> dict[str, int]:
        return {"bytes": size}


@serve.deployment(name="FloorIngress")
class FloorIngress:
    def __init__(self, model) -> None:
        self.model = model

    async def __call__(self, request: Request) -> JSONResponse:
        answer = await self.model.predict.remote(len(await request.body()))
        return JSONResponse(answer)


def build_floor(cfg: Config) -> Application:
    router, cnn = cfg.serve.router, cfg.serve.cnn
    model = FloorModel.options(
        max_ongoing_requests=cnn.max_ongoing_requests,
        ray_actor_options={"num_cpus": cnn.num_cpus},
        logging_config={"enable_access_log": cfg.serve.access_log},
    ).bind()
    return FloorIngress.options(
        max_ongoing_requests=router.max_ongoing_requests,
        ray_actor_options={"num_cpus": router.num_cpus},
        logging_config={"enable_access_log": cfg.serve.access_log},
    ).bind(model)
