"""What keeps the result cache from serving an answer of other weights or another gate: the key's components,
the weights' fingerprints, answers filed under the weights that computed them, and the router's pipeline learning
fingerprints again from answers and with age (Serve handles stood in for by in-process replicas)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from models.checkpoint import model_fingerprint
from serve.cache import LruStore, ResultCache, cache_key, image_digest, roles_for
from serve.pipeline import EnsemblePipeline
from serve.schema import GateSettings
from tests.helpers import CACHE_FINGERPRINTS as FINGERPRINTS
from tests.helpers import SPACES
from tests.helpers import router_answer as answer
from tests.helpers import run_async as run

SETTINGS = GateSettings(w_cnn=0.4, threshold=0.85)


# ------------------------------------------------------------------------------------------- key


def base_key(**changes) -> str:
    parts = {
        "digest": image_digest(np.arange(64, dtype=np.uint8).reshape(8, 8)),
        "mode": "adaptive",
        "heads": ("nih14", "covid"),
        "settings": SETTINGS,
        "fingerprints": FINGERPRINTS,
    }
    parts.update(changes)
    return cache_key(parts["digest"], parts["mode"], parts["heads"], parts["settings"], parts["fingerprints"])


@pytest.mark.parametrize(
    "change",
    [
        {"digest": image_digest(np.arange(64, dtype=np.uint8).reshape(8, 8)[::-1])},  # other pixels
        {"digest": image_digest(np.arange(64, dtype=np.uint8).reshape(4, 16))},  # same bytes, other shape
        {"digest": image_digest(np.arange(64, dtype=np.uint16).reshape(8, 8))},  # other dtype
        {"mode": "ensemble"},
        {"heads": ("covid",)},
        {"heads": ("covid", "nih14")},  # the order is part of the request as the router sees it
        {"settings": GateSettings(w_cnn=0.5, threshold=0.85)},
        {"settings": GateSettings(w_cnn=0.4, threshold=0.8)},
        {"settings": GateSettings(w_cnn=0.4, threshold=0.85, temperatures={"cnn": {"nih14": 1.5}})},
        {"settings": GateSettings(w_cnn=0.4, threshold=0.85, temperatures={"vit": {"covid": 0.8}})},
        {"fingerprints": {**FINGERPRINTS, "cnn": "d" * 64}},
        {"fingerprints": {**FINGERPRINTS, "vit": "w" * 64}},  # adaptive could call the ViT
    ],
)
def test_each_component_changes_the_key(change):
    assert base_key(**change) != base_key()


def test_what_cannot_change_the_answer_leaves_the_key_alone():
    """Finding thresholds only pick findings from the probabilities, which the router does from the live settings
    on every hit; a model that cannot answer in the mode (the ViT in cnn mode) is not part of the key."""
    thresholds = GateSettings(w_cnn=0.4, threshold=0.85, finding_threshold=0.3, finding_thresholds={"Mass": 0.2})
    assert base_key(settings=thresholds) == base_key()
    cnn_only = base_key(mode="cnn")
    assert base_key(mode="cnn", fingerprints={**FINGERPRINTS, "vit": "w" * 64}) == cnn_only
    assert base_key(mode="cnn", fingerprints={"cnn": FINGERPRINTS["cnn"]}) == cnn_only
    assert image_digest(np.zeros((4, 4), np.uint8)) == image_digest(np.zeros((4, 4), np.uint8, order="F"))


def test_a_key_without_the_fingerprints_it_needs_is_refused():
    with pytest.raises(ValueError, match="fingerprint"):
        base_key(fingerprints={"cnn": FINGERPRINTS["cnn"]})  # adaptive needs the ViT's too
    assert roles_for("vit") == ("vit",) and roles_for("ensemble") == ("cnn", "vit")
    with pytest.raises(ValueError, match="unknown mode"):
        roles_for("fastest")


def test_fingerprint_follows_the_weights_not_the_path(tmp_path):
    """Two runs can both have `checkpoint_000005`: the bytes decide, and so do the backend and its ONNX file."""
    first, second, same = (tmp_path / name / "checkpoint.pt" for name in ("a", "b", "c"))
    for path, content in ((first, b"weights one"), (second, b"weights two"), (same, b"weights one")):
        path.parent.mkdir()
        path.write_bytes(content)
    torch_info: dict = {"version": "checkpoint_000005"}
    assert model_fingerprint(first, torch_info) == model_fingerprint(same, torch_info)
    assert model_fingerprint(first, torch_info) != model_fingerprint(second, torch_info)
    assert model_fingerprint(first, torch_info) == model_fingerprint(first, {"backend": "torch"})
    onnx = {"backend": "onnx", "onnx_sha256": "1" * 64}
    assert model_fingerprint(first, onnx) != model_fingerprint(first, torch_info)
    assert model_fingerprint(first, onnx) != model_fingerprint(first, {**onnx, "onnx_sha256": "2" * 64})


def test_an_answer_is_filed_under_the_weights_that_computed_it():
    """The router looked up with the fingerprints it knew; the replica that answered had new weights (a redeploy
    mid-request): the entry goes under the new weights, so the old key still misses."""
    cache = ResultCache(LruStore(8))
    gray = np.full((16, 16), 9, np.uint8)
    new = {**FINGERPRINTS, "cnn": "n" * 64}
    lookup = run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, FINGERPRINTS))
    run(cache.remember(lookup, "cnn", ("nih14",), SETTINGS, answer(fingerprints={"cnn": new["cnn"]})))
    assert not run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, FINGERPRINTS)).hit
    assert run(cache.lookup(gray, "cnn", ("nih14",), SETTINGS, new)).hit


# ------------------------------------------------------------------------------------------- pipeline


class FakeHandle:
    """A DeploymentHandle stand-in: ``describe`` / ``predict`` answer with this replica's fingerprint."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint, self.describes = fingerprint, 0
        handle = self

        class Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, *args):
                return handle.serve(self.name)

        self.describe, self.predict = Method("describe"), Method("predict")

    async def serve(self, method: str) -> dict:
        if method == "describe":
            self.describes += 1
            meta = {"storage_size": 32, "input_size": 32}
            spaces = [space.to_dict() for space in SPACES]
            return {"fingerprint": self.fingerprint, "preprocessing": meta, "label_spaces": spaces, "version": "x"}
        return {
            "nih14": np.full(14, 0.5, np.float32),  # confidence 0.5
            "covid": np.full(4, 0.25, np.float32),  # 0.25
            "pneumonia": np.array([0.1, 0.7, 0.2], np.float32),  # 0.7
            "fingerprint": self.fingerprint,
        }


def test_pipeline_relearns_fingerprints_from_answers_and_with_age(monkeypatch):
    handle = FakeHandle("old")
    pipeline = EnsemblePipeline({"cnn": handle, "vit": FakeHandle("vit")}, timeout_s=5)

    async def scenario():
        assert await pipeline.fingerprints(("cnn",)) == {"cnn": "old"}
        assert await pipeline.fingerprints(("cnn",)) == {"cnn": "old"} and handle.describes == 1  # fresh: kept
        handle.fingerprint = "new"  # the replica came back with other weights
        result = await pipeline.answer(np.zeros((40, 40), np.uint8), "cnn", SETTINGS)
        assert result["fingerprints"] == {"cnn": "new"} and "fingerprint" not in result["probs"]
        assert await pipeline.fingerprints(("cnn",)) == {"cnn": "new"}  # the answer made it ask again
        handle.fingerprint = "newer"
        monkeypatch.setattr("serve.pipeline.FINGERPRINT_MAX_AGE_S", 0.0)
        await asyncio.sleep(0.01)
        assert await pipeline.fingerprints(("cnn",)) == {"cnn": "newer"}  # no answer needed: it aged out

    run(scenario())


def test_the_gate_scores_the_heads_asked_for_and_every_head_by_default():
    """``heads`` (the router's ``?head=``): the CNN's confidence over those heads only; every head is answered."""
    pipeline = EnsemblePipeline({"cnn": FakeHandle("c"), "vit": FakeHandle("v")}, timeout_s=5)
    gray = np.zeros((40, 40), np.uint8)
    settings = GateSettings(w_cnn=0.4, threshold=0.6)

    async def scenario():
        pneumonia = await pipeline.answer(gray, "adaptive", settings, ("pneumonia",))
        every = await pipeline.answer(gray, "adaptive", settings)
        return pneumonia, every

    pneumonia, every = run(scenario())
    assert pneumonia["cnn_confidence"] == pytest.approx(0.7) and not pneumonia["escalated"]
    assert set(pneumonia["probs"]) == {"nih14", "covid", "pneumonia"}
    assert every["cnn_confidence"] == pytest.approx(0.25) and every["escalated"]
    assert every["models_used"] == ["cnn", "vit"]


def test_concurrent_requests_share_one_describe_call(monkeypatch):
    handle = FakeHandle("c")
    pipeline = EnsemblePipeline({"cnn": handle, "vit": FakeHandle("v")}, timeout_s=5)

    async def scenario():
        await asyncio.gather(*(pipeline.fingerprints(("cnn",)) for _ in range(8)))
        assert handle.describes == 1

    run(scenario())


def test_a_model_that_cannot_describe_itself_leaves_the_request_uncached_not_failed():
    """Adaptive with the ViT down: the cache cannot key the request, but the CNN alone can still answer it."""
    from ray.serve.exceptions import RayServeException

    from serve.router import EnsembleRouter

    class DownHandle(FakeHandle):
        async def serve(self, method: str) -> dict:
            raise RayServeException("replica gone")

    router = SimpleNamespace(  # the router's state that _cached_answer reads; no Serve replica needed
        pipeline=EnsemblePipeline({"cnn": FakeHandle("c"), "vit": DownHandle("v")}, timeout_s=5),
        cache=ResultCache(LruStore(8)),
    )
    cached_answer = EnsembleRouter.func_or_class._cached_answer
    always_cnn = GateSettings(w_cnn=0.4, threshold=0.0)
    result, lookup = run(cached_answer(router, np.zeros((40, 40), np.uint8), "adaptive", ("covid",), always_cnn))
    assert result["models_used"] == ["cnn"] and not lookup.hit and len(router.cache.store) == 0
