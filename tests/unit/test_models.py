"""Models (no Ray): one head per label space on the tiny timm models, the masked multi-task loss, the ensemble rule,
local weights."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from models.ensemble import adaptive, confidence, fuse, needs_vit
from models.factory import PretrainedWeightsError, build_model
from models.labels import by_head, label_key
from models.losses import multitask_loss
from tests.helpers import SPACES

HEADS = by_head(SPACES)


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_one_head_per_label_space_and_uint8_input(arch):
    three_class = HEADS["covid"].with_classes(("COVID", "Normal", "Viral Pneumonia"))  # a 3-class COVID release
    spaces = tuple(three_class if s.head == "covid" else s for s in SPACES)
    model = build_model(arch, 64, spaces).eval()
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    out = model(images)
    assert list(out) == ["nih14", "covid", "pneumonia"] == [space.head for space in model.label_spaces]
    assert {head: tuple(v.shape) for head, v in out.items()} == {"nih14": (3, 14), "covid": (3, 3), "pneumonia": (3, 3)}
    as_float = model(images.float() / 255.0)
    for head in out:
        assert torch.allclose(out[head], as_float[head], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_the_model_on_cuda_answers_like_on_cpu(arch):
    """The same weights and uint8 batch on the GPU (what a replica or train worker with num_gpus runs) and the CPU."""
    torch.manual_seed(0)
    model = build_model(arch, 64, SPACES).eval()
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        on_cpu = model(images)
        on_gpu = model.cuda()(images.cuda())
    for space in SPACES:
        assert on_gpu[space.head].device.type == "cuda"
        torch.testing.assert_close(on_gpu[space.head].cpu(), on_cpu[space.head], atol=1e-3, rtol=1e-3)


def _batch(source: list[int], nih: torch.Tensor, covid: list[int], pneumonia: list[int]) -> dict[str, torch.Tensor]:
    return {
        "source": torch.tensor(source),
        label_key("nih14"): nih,
        label_key("covid"): torch.tensor(covid),
        label_key("pneumonia"): torch.tensor(pneumonia),
    }


def test_masked_loss_ignores_the_other_sources_labels():
    torch.manual_seed(0)
    logits = {s.head: torch.randn(5, len(s.classes), requires_grad=True) for s in SPACES}
    nih = torch.randint(0, 2, (5, 14)).float()
    batch = _batch([0, 0, 1, 1, 2], nih, [-1, -1, 2, 0, -1], [-1, -1, -1, -1, 1])
    loss, parts = multitask_loss(logits, batch, SPACES)
    expected = {
        "nih14": F.binary_cross_entropy_with_logits(logits["nih14"][:2], nih[:2]),
        "covid": F.cross_entropy(logits["covid"][2:4], torch.tensor([2, 0])),
        "pneumonia": F.cross_entropy(logits["pneumonia"][4:], torch.tensor([1])),
    }
    for head, value in expected.items():
        assert torch.allclose(parts[head], value), head
    # Garbage in the masked-out labels changes nothing.
    garbage = dict(batch)
    garbage[label_key("nih14")] = torch.cat([nih[:2], torch.ones(3, 14)])  # rows 2-4 are not NIH's
    assert torch.allclose(multitask_loss(logits, garbage, SPACES)[0], loss)
    loss.backward()
    assert torch.all(logits["covid"].grad[[0, 1, 4]] == 0) and torch.all(logits["nih14"].grad[2:] == 0)
    assert torch.all(logits["pneumonia"].grad[:4] == 0)


def test_loss_of_a_single_source_batch_still_reaches_every_head():
    model = build_model("test_efficientnet", 32, SPACES)
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    loss, parts = multitask_loss(model(images), _batch([0, 0], torch.ones(2, 14), [-1, -1], [-1, -1]), SPACES)
    loss.backward()
    assert parts["covid"] == 0 and parts["pneumonia"] == 0
    for head in ("covid", "pneumonia"):  # zero, but present: DDP needs every parameter used
        assert model.heads[head].weight.grad is not None


def test_positive_weights_scale_positives():
    logits = {s.head: torch.zeros(1, len(s.classes)) for s in SPACES}
    labels = torch.zeros(1, 14)
    labels[0, 0] = 1
    batch = _batch([0], labels, [-1], [-1])
    plain, _ = multitask_loss(logits, batch, SPACES)
    weighted, _ = multitask_loss(logits, batch, SPACES, pos_weights={"nih14": torch.full((14,), 3.0)})
    assert weighted > plain


def test_ensemble_rule_on_hand_made_probabilities():
    p_cnn = {
        "nih14": np.array([[0.95] + [0.02] * 13, [0.6] + [0.01] * 13]),  # confidences 0.95 and 0.6
        "covid": np.array([[0.9, 0.05, 0.03, 0.02], [0.97, 0.01, 0.01, 0.01]]),  # 0.9 and 0.97
        "pneumonia": np.array([[0.92, 0.04, 0.04], [0.98, 0.01, 0.01]]),  # 0.92 and 0.98
    }
    p_vit = {s.head: np.full((2, len(s.classes)), 1 / len(s.classes)) for s in SPACES}
    np.testing.assert_allclose(confidence(p_cnn, HEADS), [0.9, 0.6])
    assert needs_vit(p_cnn, HEADS, 0.85).tolist() == [False, True]
    assert needs_vit(p_cnn, HEADS, 0.95).tolist() == [True, True]
    probs, used = adaptive(p_cnn, p_vit, HEADS, w_cnn=0.4, threshold=0.85)
    assert used.tolist() == [False, True]
    np.testing.assert_allclose(probs["nih14"][0], p_cnn["nih14"][0])
    np.testing.assert_allclose(probs["nih14"][1, 0], 0.4 * 0.6 + 0.6 / 14)
    np.testing.assert_allclose(probs["covid"][1], fuse(p_cnn, p_vit, 0.4)["covid"][1])
    np.testing.assert_allclose(probs["pneumonia"][1], 0.4 * p_cnn["pneumonia"][1] + 0.6 / 3)
    # Scored on one head only (evaluation of an NIH image): the other heads do not lower its confidence.
    scored = {"nih14": np.array([True, True]), "covid": np.array([False, False]), "pneumonia": np.array([False] * 2)}
    np.testing.assert_allclose(confidence(p_cnn, HEADS, scored), [0.95, 0.6])
    only_pneumonia = {head: np.array([head == "pneumonia"] * 2) for head in HEADS}
    np.testing.assert_allclose(confidence(p_cnn, HEADS, only_pneumonia), [0.92, 0.98])
    with pytest.raises(ValueError, match="w_cnn"):
        fuse(p_cnn, p_vit, 1.5)


def test_pretrained_from_a_local_timm_state_dict(tmp_path):
    reference = timm.create_model("test_efficientnet", pretrained=False)  # RGB stem and a 1000-class classifier
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("test_efficientnet", 64, SPACES, pretrained=path)
    stem = reference.state_dict()["conv_stem.weight"]
    assert torch.allclose(model.backbone.conv_stem.weight, stem.sum(dim=1, keepdim=True), atol=1e-6)


def test_pretrained_errors_name_file_and_keys(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found: .*nope.pth.*never downloaded"):
        build_model("test_efficientnet", 64, SPACES, pretrained=tmp_path / "nope.pth")
    vit = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), vit)
    with pytest.raises(PretrainedWeightsError, match="vit.pth: (shape mismatch|missing backbone keys|unexpected keys)"):
        build_model("test_efficientnet", 64, SPACES, pretrained=vit)
