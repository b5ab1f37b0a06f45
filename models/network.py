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
from models import metadata as patient_metadata
from models.labels import LabelSpace


class CxrNet(nn.Module):
    """``forward(images [B,1,H,W] uint8 or float in [0,1], metadata [B, F] or None) -> {head: [B, classes]}``
    logits, one head per label space, in the order given (the order of the ``source`` ids in batches).

    With ``metadata=True`` (the fusion head) the heads read the image features concatenated with an embedding of
    the patient metadata (``models/metadata.py``); rows without metadata, and calls without it, use the "all
    missing" vector. Without it, ``metadata`` is ignored."""

    def __init__(
        self,
        arch: str,
        input_size: int,
        label_spaces: tuple[LabelSpace, ...],
        mean: float = 0.5,
        std: float = 0.25,
        drop_rate: float = 0.0,
        options: dict[str, Any] | None = None,
        metadata: bool = False,
    ) -> None:
        super().__init__()
        self.options = dict(options or {})
        kwargs = {"img_size": input_size} if _takes_img_size(arch) else {}
        self.backbone = timm.create_model(
            arch, pretrained=False, num_classes=0, in_chans=1, drop_rate=drop_rate, **kwargs, **self.options
        )
        # what forward returns with num_classes=0: a hidden head layer (MobileNetV3, EfficientViT) widens it
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        if not label_spaces:
            raise ValueError("a model needs at least one label space")
        self.label_spaces = tuple(label_spaces)
        self.metadata_encoder = patient_metadata.MetadataEncoder() if metadata else None
        width = features + (patient_metadata.EMBEDDING_SIZE if metadata else 0)
        self.heads = nn.ModuleDict({space.head: nn.Linear(width, len(space.classes)) for space in label_spaces})
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=True)
        self.register_buffer("std", torch.tensor(float(std)), persistent=True)
        self.arch, self.input_size = arch, input_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return (images - self.mean) / self.std

    @property
    def uses_metadata(self) -> bool:
        return self.metadata_encoder is not None

    def classify(self, features: torch.Tensor, metadata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The heads on pooled image features (with the metadata embedding when the model fuses it)."""
        if self.metadata_encoder is not None:
            if metadata is None:
                metadata = patient_metadata.missing(features.shape[0], features.device)
            features = torch.cat([features, self.metadata_encoder(metadata.to(features.device))], dim=1)
        return {name: head(features) for name, head in self.heads.items()}

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.classify(self.backbone(self.normalize(images)), metadata)


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
