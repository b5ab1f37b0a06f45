"""Building the CNN and ViT from config, and loading local pretrained weights (nothing is ever downloaded).

``pretrained`` may be a timm state dict (``.pth``/``.bin``/``.safetensors``; 3-channel stems are folded to our
single channel by timm's ``adapt_input_conv``, i.e. summed over RGB, which is the gray image seen on all three
channels; classifier weights are dropped), a checkpoint of ours (``{"model": state_dict, ...}``) or CheXNet's
DenseNet-121 ``model.pth.tar`` (``models/chexnet.py``: backbone, and its classifier onto the nih14 head by name).
Files are read with ``torch.load(weights_only=True)``: one that pickles other objects is refused with a recipe to
convert it, never unpickled.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from timm.models import adapt_input_conv

from models import chexnet
from models.errors import CxrError
from models.labels import LabelSpace
from models.network import CxrNet

log = logging.getLogger(__name__)


class PretrainedWeightsError(CxrError, ValueError):
    """A local weights file that is missing or does not fit the model; the message names file and keys."""


def build_model(
    arch: str,
    input_size: int,
    label_spaces: tuple[LabelSpace, ...],
    mean: float = 0.5,
    std: float = 0.25,
    drop_rate: float = 0.0,
    pretrained: str | Path | None = None,
    options: dict[str, Any] | None = None,
    metadata: bool = False,
) -> CxrNet:
    model = CxrNet(
        arch, input_size, label_spaces, mean=mean, std=std, drop_rate=drop_rate, options=options, metadata=metadata
    )
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights not found: {path} (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unpickling_error(path, err) from err
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            return loaded[key]
    if not isinstance(loaded, dict):
        raise PretrainedWeightsError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return loaded


def _unpickling_error(path: Path, err: pickle.UnpicklingError) -> PretrainedWeightsError:
    """torch's weights-only refusal, said shortly: which object, and how to convert a trusted file once."""
    text = str(err)
    tail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
    detail = " ".join(tail.split())[:200]
    if "Unsupported global" not in detail:
        return PretrainedWeightsError(f"{path}: not a readable PyTorch weights file ({detail})")
    what = detail.split(" was not an allowed global")[0]
    return PretrainedWeightsError(
        f"{path}: besides tensors the file pickles other objects ({what}); files are read with "
        "torch.load(weights_only=True) and such objects are never unpickled. If you trust the file, save its state "
        "dict once: python -c \"import torch; c = torch.load('IN', weights_only=False); "
        "torch.save(c.get('state_dict', c), 'OUT.pth')\" and point pretrained at OUT.pth"
    )


def _to_our_keys(model: CxrNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a plain timm state dict onto ``backbone.*``; adapt the RGB stem to one channel; drop timm's classifier."""
    if any(key.startswith("backbone.") for key in state):
        return state  # one of our checkpoints
    if chexnet.is_chexnet(state):
        return chexnet.to_our_keys(model, state)
    first_conv = model.backbone.pretrained_cfg.get("first_conv")
    classifier = model.backbone.pretrained_cfg.get("classifier")
    mapped = {}
    for key, value in state.items():
        key = chexnet.rename_legacy_densenet(key)  # torchvision's old DenseNet names (``norm.1``) -> timm's
        if classifier and key.startswith(f"{classifier}."):
            continue
        if first_conv and key == f"{first_conv}.weight" and value.ndim == 4 and value.shape[1] != 1:
            value = adapt_input_conv(1, value)
        mapped[f"backbone.{key}"] = value
    return mapped


def load_pretrained(model: CxrNet, path: str | Path, strict_backbone: bool = True) -> None:
    """Load local weights into ``model``; a shape mismatch or missing backbone keys fail with their names."""
    path = Path(path)
    try:
        state = _to_our_keys(model, _read_state_dict(path))
    except chexnet.CheXNetLayoutError as err:
        raise PretrainedWeightsError(f"{path}: {err}") from err
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise PretrainedWeightsError(f"{path}: shape mismatch for {', '.join(mismatched[:10])}")
    result = model.load_state_dict(state, strict=False)
    # files older than torch 0.4 have no BatchNorm ``num_batches_tracked``: the model's counters stay
    missing_backbone = [
        k for k in result.missing_keys if k.startswith("backbone.") and not k.endswith("num_batches_tracked")
    ]
    if strict_backbone and missing_backbone:
        raise PretrainedWeightsError(f"{path}: missing backbone keys {missing_backbone[:10]} (is it for {model.arch}?)")
    if result.unexpected_keys:
        raise PretrainedWeightsError(f"{path}: unexpected keys {result.unexpected_keys[:10]}")
    log.info(
        "loaded pretrained weights from %s (heads initialised: %s)",
        path,
        [k for k in result.missing_keys if k.startswith("heads.")],
    )
