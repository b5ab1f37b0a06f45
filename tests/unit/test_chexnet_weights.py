"""CheXNet's ``model.pth.tar`` through ``build_model(pretrained=...)`` (models/chexnet.py, models/factory.py).

The checkpoint is built here in the shared file's exact layout: ``{"state_dict": ...}`` with
``module.densenet121.features...`` keys, torchvision's old dense layer names (``norm.1``, ``conv.2``), no
``num_batches_tracked`` (the file predates them), a 3-channel stem and ``classifier.0`` with 14 rows. No Ray.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import timm
import torch

import models.chexnet
from models.chexnet import CHEXNET_LABELS
from models.factory import PretrainedWeightsError, build_model
from pipelines.data.datasets.nih import NIH14
from tests.helpers import SPACES

SIZE = 64
PREFIX = "module.densenet121."


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """An RGB DenseNet-121 with a 14-way classifier and non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(0)
    model = timm.create_model("densenet121", pretrained=False, num_classes=14, in_chans=3).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_var", "norm0.weight")) or ".norm" in name and name.endswith("weight"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model


def legacy_name(key: str) -> str:
    return re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)


def chexnet_state(source: torch.nn.Module, labels: tuple[str, ...], legacy: bool = True) -> dict[str, torch.Tensor]:
    """``source``'s weights in CheXNet's key layout; classifier rows in the order of ``labels``."""
    state = {}
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked") or key.startswith("classifier."):
            continue
        state[PREFIX + (legacy_name(key) if legacy else key)] = value.clone()
    rows = torch.tensor([CHEXNET_LABELS.index(name) for name in labels])  # source's rows are in CheXNet order
    state[PREFIX + "classifier.0.weight"] = source.classifier.weight.detach()[rows].clone()
    state[PREFIX + "classifier.0.bias"] = source.classifier.bias.detach()[rows].clone()
    return state


def save(path, state: dict[str, torch.Tensor], **extra) -> str:
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
    checkpoint = {"epoch": 7, "arch": "densenet121", "best_loss": 0.16, "state_dict": state, "optimizer": optimizer}
    torch.save({**checkpoint, **extra}, path)
    return str(path)


@pytest.mark.parametrize(("legacy", "shuffled"), [(True, True), (False, False)])
def test_chexnet_checkpoint_gives_backbone_and_nih14_head(tmp_path, monkeypatch, source, legacy, shuffled):
    labels = tuple(np.random.default_rng(3).permutation(CHEXNET_LABELS)) if shuffled else CHEXNET_LABELS
    state = chexnet_state(source, labels, legacy)
    if legacy:
        assert PREFIX + "features.denseblock1.denselayer1.norm.1.weight" in state
        assert PREFIX + "features.denseblock4.denselayer16.conv.2.weight" in state
    # a file whose rows come in another order says so through the label list the mapping reads
    monkeypatch.setattr(models.chexnet, "CHEXNET_LABELS", labels)
    model = build_model("densenet121", SIZE, SPACES, pretrained=save(tmp_path / "model.pth.tar", state)).eval()

    ours = model.state_dict()
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked") or key.startswith("classifier.") or key == "features.conv0.weight":
            continue
        assert torch.equal(ours[f"backbone.{key}"], value), key
    stem = source.state_dict()["features.conv0.weight"]
    assert torch.allclose(ours["backbone.features.conv0.weight"], stem.sum(dim=1, keepdim=True))
    for index, name in enumerate(NIH14):  # our order, whatever the file's
        row = CHEXNET_LABELS.index(name)
        assert torch.equal(model.heads["nih14"].weight[index], source.classifier.weight[row]), name
        assert torch.equal(model.heads["nih14"].bias[index], source.classifier.bias[row]), name

    # the gray image on all three channels of the RGB CheXNet gives the same findings as our one-channel model
    gray = torch.from_numpy(np.random.default_rng(4).integers(0, 255, (2, 1, SIZE, SIZE), dtype=np.uint8))
    with torch.inference_mode():
        ours_logits = model(gray)["nih14"]
        theirs = source(model.normalize(gray).expand(-1, 3, -1, -1))
    expected = theirs[:, [CHEXNET_LABELS.index(name) for name in NIH14]]
    torch.testing.assert_close(ours_logits, expected, atol=1e-4, rtol=1e-4)


def test_legacy_serialisation_loads_too(tmp_path, source):
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": chexnet_state(source, CHEXNET_LABELS)}, path, _use_new_zipfile_serialization=False)
    model = build_model("densenet121", SIZE, SPACES, pretrained=path)
    assert torch.equal(model.heads["nih14"].bias, source.classifier.bias)


def test_chexnet_weights_into_another_arch_fail_naming_keys(tmp_path, source):
    path = save(tmp_path / "model.pth.tar", chexnet_state(source, CHEXNET_LABELS))
    with pytest.raises(PretrainedWeightsError, match=r"model\.pth\.tar.*resnet50") as found:
        build_model("resnet50", SIZE, SPACES, pretrained=path)
    assert "module.densenet121.features.conv0.weight" in str(found.value)
    assert "backbone.conv1.weight" in str(found.value)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("13 rows", "module.densenet121.classifier.0.weight (13, 1024)"),
        ("no bias", "module.densenet121.classifier.0.bias"),
        ("no classifier", "module.densenet121.classifier.0.weight"),
        ("no norm5", "backbone.features.norm5.weight"),
    ],
)
def test_a_file_that_does_not_fit_names_the_keys(tmp_path, source, change, named):
    state = chexnet_state(source, CHEXNET_LABELS)
    if change == "13 rows":
        state[PREFIX + "classifier.0.weight"] = state[PREFIX + "classifier.0.weight"][:13]
        state[PREFIX + "classifier.0.bias"] = state[PREFIX + "classifier.0.bias"][:13]
    elif change == "no bias":
        del state[PREFIX + "classifier.0.bias"]
    elif change == "no classifier":
        del state[PREFIX + "classifier.0.weight"], state[PREFIX + "classifier.0.bias"]
    else:
        state = {key: value for key, value in state.items() if ".norm5." not in key}
    with pytest.raises(PretrainedWeightsError) as found:
        build_model("densenet121", SIZE, SPACES, pretrained=save(tmp_path / "model.pth.tar", state))
    assert named in str(found.value)


def test_a_file_that_pickles_other_objects_is_refused_with_a_recipe(tmp_path, source):
    path = save(tmp_path / "model.pth.tar", chexnet_state(source, CHEXNET_LABELS), args=argparse.Namespace(lr=1e-3))
    with pytest.raises(PretrainedWeightsError, match="argparse.Namespace") as found:
        build_model("densenet121", SIZE, SPACES, pretrained=path)
    assert "weights_only=False" in str(found.value)  # how to convert a trusted file once


def test_a_torchvision_densenet_file_loads_its_backbone(tmp_path, source):
    """torchvision's own DenseNet-121 names (no CheXNet prefix, ImageNet classifier): backbone only."""
    state = {legacy_name(k): v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
    state["classifier.weight"], state["classifier.bias"] = torch.zeros(1000, 1024), torch.zeros(1000)
    torch.save(state, tmp_path / "densenet121.pth")
    model = build_model("densenet121", SIZE, SPACES, pretrained=tmp_path / "densenet121.pth")
    block = "features.denseblock2.denselayer3.norm2.running_var"
    assert torch.equal(model.state_dict()[f"backbone.{block}"], source.state_dict()[block])
