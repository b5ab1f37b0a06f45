"""Any timm architecture in either ensemble role: the backbones users of the compared systems try build with one
input channel and our heads, and answer one forward at 64 px. No Ray, no weights (``pretrained=False``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.factory import build_model
from models.network import _takes_img_size
from tests.helpers import SPACES

SIZE = 64


@pytest.mark.parametrize(
    "arch",
    # the names CheXNet-style and hybrid systems use, plus efficientvit_b0: a "vit" name that takes no img_size and
    # whose features (head_hidden_size, 1280) are wider than its num_features
    ["densenet121", "resnet50", "efficientnet_b4", "convnextv2_tiny", "seresnet50", "efficientvit_b0"],
)
def test_backbone_builds_and_answers_every_head(arch):
    torch.manual_seed(0)
    model = build_model(arch, SIZE, SPACES).eval()
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 1, SIZE, SIZE), dtype=np.uint8))
    with torch.inference_mode():
        logits = model(batch)
    assert list(logits) == list(model.heads) == [space.head for space in SPACES]
    for name, head in model.heads.items():
        assert logits[name].shape == (2, head.out_features)
        assert torch.isfinite(logits[name]).all()
    first_conv = model.backbone.pretrained_cfg["first_conv"]
    assert model.backbone.get_submodule(first_conv).in_channels == 1


@pytest.mark.parametrize(
    ("arch", "takes"),
    [
        ("densenet121", False),
        ("convnextv2_tiny", False),
        ("test_vit", True),
        ("vit_small_patch16_224", True),
        ("swin_tiny_patch4_window7_224", True),
        ("coatnet_nano_rw_224", True),  # window sizes follow the input: needs img_size though no "vit" in the name
        ("efficientvit_b0", False),  # "vit" in the name, but a CNN-like model that refuses img_size
        ("fastvit_t8", False),
        ("cxr_hybrid_tiny", False),  # position embeddings are resized to any grid
    ],
)
def test_img_size_goes_to_the_models_that_fix_their_input_size(arch, takes):
    assert _takes_img_size(arch) is takes
