"""Building the CNN and ViT from config, and loading local pretrained weights (nothing is ever downloaded).

``pretrained`` may be a timm state dict (``.pth``/``.bin``/``.safetensors``; 3-channel stems are averaged to our
single channel, classifier weights are dropped) or a checkpoint of ours (``{"model": state_dict, ...}``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from timm.models import adapt_input_conv

from models.errors import CxrError
from models.labels import COVID_CLASSES
from models.network import CxrNet

log = logging.getLogger(__name__)


class PretrainedWeightsError(CxrError, ValueError):
    """A local weights file that is missing or does not fit the model; the message names file and keys."""


def build_model(
    arch: str,
    input_size: int,
    covid_classes: tuple[str, ...] = COVID_CLASSES,
    mean: float = 0.5,
    std: float = 0.25,
    drop_rate: float = 0.0,
    pretrained: str | Path | None = None,
    options: dict[str, Any] | None = None,
) -> CxrNet:
    model = CxrNet(arch, input_size, covid_classes, mean=mean, std=std, drop_rate=drop_rate, options=options)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights not found: {path} (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            return loaded[key]
    if not isinstance(loaded, dict):
        raise PretrainedWeightsError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return loaded


def _to_our_keys(model: CxrNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a plain timm state dict onto ``backbone.*``; adapt the RGB stem to one channel; drop timm's classifier."""
    if any(key.startswith("backbone.") for key in state):
        return state  # one of our checkpoints
    first_conv = model.backbone.pretrained_cfg.get("first_conv")
    classifier = model.backbone.pretrained_cfg.get("classifier")
    mapped = {}
    for key, value in state.items():
        if classifier and key.startswith(f"{classifier}."):
            continue
        if first_conv and key == f"{first_conv}.weight" and value.ndim == 4 and value.shape[1] != 1:
            value = adapt_input_conv(1, value)
        mapped[f"backbone.{key}"] = value
    return mapped


def load_pretrained(model: CxrNet, path: str | Path, strict_backbone: bool = True) -> None:
    """Load local weights into ``model``; a shape mismatch or missing backbone keys fail with their names."""
    path = Path(path)
    state = _to_our_keys(model, _read_state_dict(path))
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise PretrainedWeightsError(f"{path}: shape mismatch for {', '.join(mismatched[:10])}")
    result = model.load_state_dict(state, strict=False)
    missing_backbone = [k for k in result.missing_keys if k.startswith("backbone.")]
    if strict_backbone and missing_backbone:
        raise PretrainedWeightsError(f"{path}: missing backbone keys {missing_backbone[:10]} (is it for {model.arch}?)")
    if result.unexpected_keys:
        raise PretrainedWeightsError(f"{path}: unexpected keys {result.unexpected_keys[:10]}")
    log.info(
        "loaded pretrained weights from %s (heads initialised: %s)",
        path,
        [k for k in result.missing_keys if k.startswith("heads.")],
    )
