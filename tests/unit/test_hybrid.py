"""The hybrid CNN + Transformer (models/hybrid.py): timm registration, forward at two sizes, the class token's
attention map, both ensemble roles, and the served explanation's method choice (serve/explanations.py and
``EnsemblePipeline.explain`` with in-process stand-ins for the replica handles). No Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import timm
import torch
from starlette.datastructures import QueryParams

from models.checkpoint import PreprocessSpec, model_from_checkpoint, save_checkpoint
from models.explain import attention_map, explain, grad_cam, methods_for
from models.factory import build_model
from models.hybrid import CxrHybrid
from pipelines.data.datasets.nih import NIH14
from pipelines.data.datasets.pneumonia import CLASSES as PNEUMONIA_CLASSES
from serve.explanations import ExplainQuery, check_method
from serve.inputs import InputRejected
from tests.helpers import SPACES

TINY = "cxr_hybrid_tiny"


def images(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (count, 1, size, size), dtype=np.uint8)


def backbone(name: str = TINY, **kwargs: Any) -> CxrHybrid:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, in_chans=1, drop_rate=0.1, **kwargs).eval()


def test_both_variants_are_registered_with_timm():
    assert {"cxr_hybrid_densenet121", TINY} <= set(timm.list_models("cxr_hybrid_*"))
    with pytest.raises(ValueError, match="local file"):
        timm.create_model(TINY, pretrained=True)


@pytest.mark.parametrize(("name", "size", "grid"), [(TINY, 64, 8), (TINY, 96, 12), ("cxr_hybrid_densenet121", 96, 3)])
def test_forward_features_and_attention_at_any_input_size(name, size, grid):
    model = backbone(name)
    x = torch.rand(2, 1, size, size)
    with torch.inference_mode():
        features = model(x)
        tokens = model.forward_features(x)
        attention = model.class_token_attention(x)
    assert features.shape == (2, model.num_features)
    assert tokens.shape == (2, 1 + grid * grid, model.num_features)  # class token first
    assert attention.shape == (2, grid, grid)
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(2))
    assert (attention >= 0).all()


def test_the_map_is_the_attention_the_last_layer_applies(monkeypatch):
    model = backbone().train()  # the module path of nn.TransformerEncoderLayer, which calls self_attn
    attention, captured = model.encoder[-1].self_attn, {}
    original = attention.forward

    def spy(*args, **kwargs):
        output, weights = original(*args, **{**kwargs, "need_weights": True, "average_attn_weights": True})
        captured["weights"] = weights
        return output, weights

    monkeypatch.setattr(attention, "forward", spy)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        model.forward_features(x)
        to_grid = captured["weights"][:, 0, 1:]
        expected = (to_grid / to_grid.sum(dim=1, keepdim=True)).reshape(2, 8, 8)
        torch.testing.assert_close(model.class_token_attention(x), expected)


def test_densenet_hybrid_has_densenets_7x7_grid_at_224_px():
    model = backbone("cxr_hybrid_densenet121")
    assert model.num_features == 384
    with torch.inference_mode():
        assert model.class_token_attention(torch.rand(1, 1, 224, 224)).shape == (1, 7, 7)


def test_classifier_and_drop_rate_follow_timm_conventions():
    model = timm.create_model(TINY, pretrained=False, num_classes=5, in_chans=3, drop_rate=0.2)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 5)
    assert model.head_drop.p == pytest.approx(0.2)
    model.reset_classifier(0)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, model.num_features)


@pytest.mark.parametrize("role", ["cnn", "vit"])
def test_cxrnet_with_the_hybrid_in_either_role_round_trips_a_checkpoint(tmp_path, role):
    model = build_model(TINY, 64, SPACES).eval()
    batch = torch.from_numpy(images(2))
    with torch.inference_mode():
        logits = model(batch)
    assert {name: tuple(value.shape) for name, value in logits.items()} == {
        name: (2, head.out_features) for name, head in model.heads.items()
    }
    save_checkpoint(tmp_path / role, model, role=role, epoch=1, config={}, metrics={})
    again = model_from_checkpoint(tmp_path / role)  # how training, evaluation and the serving replicas rebuild it
    with torch.inference_mode():
        for name, value in again(batch).items():
            torch.testing.assert_close(value, logits[name])


def test_attention_explanation_is_the_class_tokens_attention_scaled_to_one():
    model = build_model(TINY, 64, SPACES).eval()
    batch = images(3, seed=1)
    found = attention_map(model, batch, "nih14", NIH14.index("Effusion"))
    with torch.inference_mode():
        raw = model.backbone.class_token_attention(model.normalize(torch.from_numpy(batch)))
        expected_p = torch.sigmoid(model(torch.from_numpy(batch))["nih14"][:, NIH14.index("Effusion")])
    for item, attention, p in zip(found, raw, expected_p, strict=True):
        assert item.cam.shape == (8, 8) and item.cam.max() == pytest.approx(1.0)
        np.testing.assert_allclose(item.cam, (attention / attention.max()).numpy(), atol=1e-6)
        assert item.probability == pytest.approx(float(p), abs=1e-5)
        assert item.method == "attention on backbone.encoder.1.self_attn (8x8)"


def test_grad_cam_works_on_the_hybrids_token_grid_and_methods_are_listed():
    model = build_model(TINY, 64, SPACES)
    cam = grad_cam(model, images(1), "covid", 1)[0]
    assert cam.cam.shape == (8, 8) and cam.method.startswith("grad-cam on backbone.proj")
    assert methods_for(model) == ("grad-cam", "attention")
    assert explain(model, images(1), "nih14", 0, "attention")[0].method.startswith("attention")
    cnn = build_model("test_efficientnet", 64, SPACES)
    assert methods_for(cnn) == ("grad-cam",)
    with pytest.raises(ValueError, match="not 'attention'"):
        explain(cnn, images(1), "nih14", 0, "attention")


def test_explain_query_reads_the_method():
    assert ExplainQuery.from_params(QueryParams("head=covid")).method == "grad-cam"
    assert ExplainQuery.from_params(QueryParams("")).head is None  # the model's first head, chosen by the pipeline
    assert ExplainQuery.from_params(QueryParams("method=attention&model=vit")).method == "attention"
    with pytest.raises(InputRejected) as found:
        ExplainQuery.from_params(QueryParams("method=rollout"))
    assert (found.value.status, found.value.reason) == (400, "bad_method")


class _Call:
    def __init__(self, function):
        self.function = function

    def remote(self, *args):
        return asyncio.ensure_future(self.function(*args))


class _Handle:
    """In-process stand-in for a model replica's DeploymentHandle: ``describe``, ``explain`` and ``predict`` as the
    replica."""

    def __init__(self, model, calls: list):
        info = {
            "arch": model.arch,
            "label_spaces": [space.to_dict() for space in model.label_spaces],
            "preprocessing": {"storage_size": 64, "input_size": 64},
            "explain_methods": list(methods_for(model)),
        }

        async def describe():
            return info

        async def run_explain(image, head, target, method):
            calls.append(method)
            found = explain(model, image[None], head, target, method)[0]
            return {"cam": found.cam, "probability": found.probability, "method": found.method}

        async def predict(image, metadata=None):  # the answer whose probability explain reports
            with torch.inference_mode():
                logits = model(torch.from_numpy(image[None]))
            return {s.head: s.probabilities(logits[s.head]).numpy()[0] for s in model.label_spaces}

        self.describe, self.explain, self.predict = _Call(describe), _Call(run_explain), _Call(predict)


def test_served_attention_for_a_hybrid_and_a_named_refusal_for_a_cnn():
    from serve.pipeline import EnsemblePipeline
    from serve.preprocess import Preprocessor

    hybrid, cnn = build_model(TINY, 64, SPACES).eval(), build_model("test_efficientnet", 64, SPACES).eval()
    calls: list[str] = []
    pipeline = EnsemblePipeline({"cnn": _Handle(cnn, calls), "vit": _Handle(hybrid, calls)}, timeout_s=30)
    gray = images(1, 80, seed=5)[0, 0]

    found = asyncio.run(pipeline.explain(gray, ("vit",), "nih14", "Edema", 0.4, "attention"))
    model_input = Preprocessor(PreprocessSpec(64, 64))(gray)
    expected = attention_map(hybrid, model_input[None], "nih14", NIH14.index("Edema"))[0]
    np.testing.assert_allclose(found["cam"], expected.cam, atol=1e-6)
    assert found["methods"] == {"vit": expected.method} and calls == ["attention"]

    for roles in [("cnn",), ("cnn", "vit")]:  # the ensemble needs both models to have it
        with pytest.raises(InputRejected) as refused:
            asyncio.run(pipeline.explain(gray, roles, "nih14", "Edema", 0.4, "attention"))
        assert (refused.value.status, refused.value.reason) == (400, "unsupported_method")
        assert "cnn model (test_efficientnet)" in refused.value.detail and "grad-cam" in refused.value.detail
    assert calls == ["attention"]  # refused before any replica ran a map
    with pytest.raises(InputRejected) as unknown:
        asyncio.run(pipeline.explain(gray, ("vit",), "chexpert", None, 0.4, "attention"))
    assert (unknown.value.status, unknown.value.reason) == (400, "bad_head")
    assert "(nih14, covid, pneumonia), got 'chexpert'" in unknown.value.detail
    viral = asyncio.run(pipeline.explain(gray, ("vit",), "pneumonia", "viral", 0.4, "attention"))
    expected = attention_map(hybrid, model_input[None], "pneumonia", PNEUMONIA_CLASSES.index("viral"))[0]
    assert (viral["head"], viral["target"]) == ("pneumonia", "viral")
    assert viral["probability"] == pytest.approx(expected.probability, abs=1e-6)
    check_method("grad-cam", {"cnn": {"arch": "x"}})  # replicas that predate the list offer Grad-CAM
