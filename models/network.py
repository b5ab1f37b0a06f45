"""A timm backbone with one head per dataset, taking uint8 grayscale images and normalising them itself.

Keeping normalisation inside the model means the mean and std travel with the weights (every checkpoint and
export), and data moves as uint8 up to the device.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

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
        features = self.backbone.num_features
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
    """Vision transformers fix their position embeddings to an input size; CNNs take any size."""
    return any(key in arch for key in ("vit", "deit", "beit", "eva", "swin"))
