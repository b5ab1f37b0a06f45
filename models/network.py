"""A timm backbone with one head per dataset, taking uint8 grayscale images and normalising them itself.

Keeping normalisation inside the model means the mean and std travel with the weights (every checkpoint and
export), and data moves as uint8 up to the device.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

import models.hybrid  # noqa: F401  (registers the cxr_hybrid_* architectures with timm)
from models.labels import NIH14


class CxrNet(nn.Module):
    """``forward(images [B,1,H,W] uint8 or float in [0,1]) -> {"nih14": [B,14], "covid": [B,C]}`` logits."""

    def __init__(
        self,
        arch: str,
        input_size: int,
        covid_classes: tuple[str, ...],
        mean: float = 0.5,
        std: float = 0.25,
        drop_rate: float = 0.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.options = dict(options or {})
        kwargs = {"img_size": input_size} if _takes_img_size(arch) else {}
        self.backbone = timm.create_model(
            arch, pretrained=False, num_classes=0, in_chans=1, drop_rate=drop_rate, **kwargs, **self.options
        )
        # what forward returns with num_classes=0: a hidden head layer (MobileNetV3, EfficientViT) widens it
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.heads = nn.ModuleDict(
            {"nih14": nn.Linear(features, len(NIH14)), "covid": nn.Linear(features, len(covid_classes))}
        )
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=True)
        self.register_buffer("std", torch.tensor(float(std)), persistent=True)
        self.arch, self.input_size, self.covid_classes = arch, input_size, tuple(covid_classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(self.normalize(images))
        return {name: head(features) for name, head in self.heads.items()}


def _takes_img_size(arch: str) -> bool:
    """Models that fix their position embeddings or windows to an input size (ViT, Swin, CaiT, CoAtNet, ...) take
    ``img_size``; CNNs take any size. timm's own flag (``fixed_input_size``) decides; for a name timm has no
    configuration for, the name does."""
    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError:  # an unknown tag: timm.create_model names it
        cfg = None
    if cfg is not None:
        return bool(cfg.fixed_input_size)
    return any(key in arch for key in ("vit", "deit", "beit", "eva", "swin"))
