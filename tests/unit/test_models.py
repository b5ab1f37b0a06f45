"""Models (no Ray): two heads on the tiny timm models, masked multi-task loss, the ensemble rule, local weights."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from models.ensemble import adaptive, confidence, fuse, needs_vit
from models.factory import PretrainedWeightsError, build_model
from models.losses import multitask_loss


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_two_heads_and_uint8_input(arch):
    model = build_model(arch, 64, covid_classes=("COVID", "Normal", "Viral Pneumonia")).eval()
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    out = model(images)
    assert out["nih14"].shape == (3, 14) and out["covid"].shape == (3, 3)
    as_float = model(images.float() / 255.0)
    assert torch.allclose(out["nih14"], as_float["nih14"], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_the_model_on_cuda_answers_like_on_cpu(arch):
    """The same weights and uint8 batch on the GPU (what a replica or train worker with num_gpus runs) and the CPU."""
    torch.manual_seed(0)
    model = build_model(arch, 64).eval()
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        on_cpu = model(images)
        on_gpu = model.cuda()(images.cuda())
    for head in ("nih14", "covid"):
        assert on_gpu[head].device.type == "cuda"
        torch.testing.assert_close(on_gpu[head].cpu(), on_cpu[head], atol=1e-3, rtol=1e-3)


def test_masked_loss_ignores_the_other_sources_labels():
    torch.manual_seed(0)
    logits = {"nih14": torch.randn(4, 14, requires_grad=True), "covid": torch.randn(4, 4, requires_grad=True)}
    source = torch.tensor([0, 0, 1, 1])
    nih = torch.randint(0, 2, (4, 14)).float()
    covid = torch.tensor([-1, -1, 2, 0])
    loss, parts = multitask_loss(logits, source, nih, covid)
    expected_nih = F.binary_cross_entropy_with_logits(logits["nih14"][:2], nih[:2])
    expected_covid = F.cross_entropy(logits["covid"][2:], covid[2:])
    assert torch.allclose(parts["nih14"], expected_nih) and torch.allclose(parts["covid"], expected_covid)
    # Garbage in the masked-out labels changes nothing.
    nih_garbage = nih.clone()
    nih_garbage[2:] = 1.0
    assert torch.allclose(multitask_loss(logits, source, nih_garbage, covid)[0], loss)
    loss.backward()
    assert torch.all(logits["covid"].grad[:2] == 0) and torch.all(logits["nih14"].grad[2:] == 0)


def test_loss_of_a_single_source_batch_still_reaches_both_heads():
    model = build_model("test_efficientnet", 32)
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    loss, parts = multitask_loss(
        model(images), torch.zeros(2, dtype=torch.long), torch.ones(2, 14), torch.tensor([-1, -1])
    )
    loss.backward()
    assert parts["covid"] == 0
    assert model.heads["covid"].weight.grad is not None  # zero, but present: DDP needs every parameter used


def test_positive_weights_scale_positives():
    logits = {"nih14": torch.zeros(1, 14), "covid": torch.zeros(1, 4)}
    labels = torch.zeros(1, 14)
    labels[0, 0] = 1
    plain, _ = multitask_loss(logits, torch.tensor([0]), labels, torch.tensor([-1]))
    weighted, _ = multitask_loss(
        logits, torch.tensor([0]), labels, torch.tensor([-1]), pos_weight=torch.full((14,), 3.0)
    )
    assert weighted > plain


def test_ensemble_rule_on_hand_made_probabilities():
    p_cnn = {
        "nih14": np.array([[0.95] + [0.02] * 13, [0.6] + [0.01] * 13]),  # confidences 0.95 and 0.6
        "covid": np.array([[0.9, 0.05, 0.03, 0.02], [0.97, 0.01, 0.01, 0.01]]),  # 0.9 and 0.97
    }
    p_vit = {"nih14": np.full((2, 14), 0.5), "covid": np.full((2, 4), 0.25)}
    np.testing.assert_allclose(confidence(p_cnn), [0.9, 0.6])
    assert needs_vit(p_cnn, 0.85).tolist() == [False, True]
    assert needs_vit(p_cnn, 0.95).tolist() == [True, True]
    probs, used = adaptive(p_cnn, p_vit, w_cnn=0.4, threshold=0.85)
    assert used.tolist() == [False, True]
    np.testing.assert_allclose(probs["nih14"][0], p_cnn["nih14"][0])
    np.testing.assert_allclose(probs["nih14"][1, 0], 0.4 * 0.6 + 0.6 * 0.5)
    np.testing.assert_allclose(probs["covid"][1], fuse(p_cnn, p_vit, 0.4)["covid"][1])
    # Scored on one head only (evaluation of an NIH image): the covid head does not lower its confidence.
    scored = {"nih14": np.array([True, True]), "covid": np.array([False, False])}
    np.testing.assert_allclose(confidence(p_cnn, scored), [0.95, 0.6])
    with pytest.raises(ValueError, match="w_cnn"):
        fuse(p_cnn, p_vit, 1.5)


def test_pretrained_from_a_local_timm_state_dict(tmp_path):
    reference = timm.create_model("test_efficientnet", pretrained=False)  # RGB stem and a 1000-class classifier
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("test_efficientnet", 64, pretrained=path)
    stem = reference.state_dict()["conv_stem.weight"]
    assert torch.allclose(model.backbone.conv_stem.weight, stem.sum(dim=1, keepdim=True), atol=1e-6)


def test_pretrained_errors_name_file_and_keys(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found: .*nope.pth.*never downloaded"):
        build_model("test_efficientnet", 64, pretrained=tmp_path / "nope.pth")
    vit = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), vit)
    with pytest.raises(PretrainedWeightsError, match="vit.pth: (shape mismatch|missing backbone keys|unexpected keys)"):
        build_model("test_efficientnet", 64, pretrained=vit)
