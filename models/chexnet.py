"""CheXNet's DenseNet-121 checkpoint (``model.pth.tar``) onto our model: the backbone, and its 14-way classifier
onto the ``nih14`` head by label name.

The widely shared file holds ``{"state_dict": {...}, ...}`` with keys such as
``module.densenet121.features.conv0.weight`` (``module.`` from ``DataParallel``), dense layers in torchvision's old
naming (``denselayer1.norm.1.weight``, ``conv.1``, ``norm.2``, ``conv.2``; the new ``norm1``/``conv1`` are taken
too) and ``module.densenet121.classifier.0.weight``/``bias``: a ``Linear(1024, 14)`` (then a sigmoid) in
``CHEXNET_LABELS`` order. timm's DenseNet-121 has the same module tree, so the backbone maps key for key; the RGB
stem is folded to our channel count like any timm weights (summed over RGB: the gray image seen on all three
channels), and old files' missing ``num_batches_tracked`` counters keep the model's.

Only the mapping lives here; ``models.factory.load_pretrained`` reads the file, calls ``to_our_keys`` when
``is_chexnet`` says so, loads, and turns a ``CheXNetLayoutError`` into a ``PretrainedWeightsError`` with the path.
"""

from __future__ import annotations

import logging
import re

import torch
from timm.models import adapt_input_conv
from torch import nn

log = logging.getLogger(__name__)

# CheXNet's output order (Rajpurkar et al. 2017), which is NIH ChestX-ray14's; rows are mapped by name, never by
# position, onto the model's multi-label head that has these findings.
CHEXNET_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
PREFIXES = ("module.", "densenet121.")
CLASSIFIER_KEYS = (("classifier.0.weight", "classifier.0.bias"), ("classifier.weight", "classifier.bias"))
STEM = "features.conv0.weight"
_LEGACY_DENSE_LAYER = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(.+)$")


class CheXNetLayoutError(ValueError):
    """A CheXNet-style state dict that does not fit the model; the message names the keys."""


def rename_legacy_densenet(key: str) -> str:
    """torchvision's pre-0.4 dense layer names (``denselayer1.norm.1.weight``) -> ``denselayer1.norm1.weight``."""
    match = _LEGACY_DENSE_LAYER.match(key)
    return f"{match.group(1)}{match.group(2)}.{match.group(3)}" if match else key


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _chexnet_name(key: str) -> str:
    return f"module.densenet121.{key}"


def is_chexnet(state: dict[str, torch.Tensor]) -> bool:
    """A CheXNet state dict: keys under ``densenet121.`` (after ``DataParallel``'s ``module.``)."""
    return any(key.removeprefix("module.").startswith("densenet121.") for key in state)


def to_our_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``backbone.*`` from CheXNet's features and ``heads.nih14.*`` from its classifier, rows in our label order."""
    original = {rename_legacy_densenet(_strip(key)): key for key in state}
    renamed = {name: state[key] for name, key in original.items()}
    classifier_keys = next((pair for pair in CLASSIFIER_KEYS if pair[0] in renamed or pair[1] in renamed), None)
    if classifier_keys is None:
        raise CheXNetLayoutError(
            f"no classifier in the CheXNet checkpoint: expected {_chexnet_name(CLASSIFIER_KEYS[0][0])} and "
            f"{_chexnet_name(CLASSIFIER_KEYS[0][1])}"
        )
    mapped = {f"backbone.{name}": value for name, value in renamed.items() if not name.startswith("classifier.")}
    _check_backbone_fits(model, mapped, {f"backbone.{name}": key for name, key in original.items()})
    stem = mapped["backbone." + STEM]
    in_chans = model.state_dict()["backbone." + STEM].shape[1]
    if stem.ndim == 4 and stem.shape[1] != in_chans:
        mapped["backbone." + STEM] = adapt_input_conv(in_chans, stem)
    weight_key, bias_key = classifier_keys
    names = (original.get(weight_key, _chexnet_name(weight_key)), original.get(bias_key, _chexnet_name(bias_key)))
    head = findings_head(model)
    if head is None:
        log.warning("CheXNet checkpoint: the model has no multi-label head over its findings; classifier not loaded")
        return mapped
    weight, bias = map_classifier(renamed.get(weight_key), renamed.get(bias_key), names, ours=head.classes)
    mapped[f"heads.{head.head}.weight"], mapped[f"heads.{head.head}.bias"] = weight, bias
    log.info("CheXNet checkpoint: DenseNet-121 backbone and its 14 findings mapped onto the %s head", head.head)
    return mapped


def findings_head(model: nn.Module):
    """The model's multi-label label space whose classes are all CheXNet findings (NIH's), or None."""
    for space in getattr(model, "label_spaces", ()):
        if space.multi_label and set(space.classes) <= set(CHEXNET_LABELS):
            return space
    return None


def _check_backbone_fits(model: nn.Module, mapped: dict[str, torch.Tensor], original: dict[str, str]) -> None:
    own = model.state_dict()
    arch = getattr(model, "arch", type(model).__name__)
    needed = [k for k in own if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in mapped]
    unexpected = [original[k] for k in mapped if k not in own]
    if missing or unexpected:
        raise CheXNetLayoutError(
            f"a CheXNet (DenseNet-121) checkpoint does not fit model {arch}: {len(missing)} of the model's keys "
            f"missing from the file {missing[:5]}, {len(unexpected)} keys of the file unknown to the model "
            f"{unexpected[:5]} (CheXNet needs arch densenet121)"
        )
    mismatched = [
        f"{original[k]} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if v.shape != own[k].shape and not k.endswith(STEM)
    ]
    if mismatched:
        raise CheXNetLayoutError(f"shape mismatch for {', '.join(mismatched[:5])}")


def map_classifier(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    keys: tuple[str, str],
    labels: tuple[str, ...] | None = None,
    ours: tuple[str, ...] = CHEXNET_LABELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's rows for ``ours``, picked by name from its ``labels`` (default ``CHEXNET_LABELS``)."""
    labels = CHEXNET_LABELS if labels is None else labels
    if weight is None or bias is None:
        raise CheXNetLayoutError(f"the classifier needs both {keys[0]} and {keys[1]}")
    if weight.ndim != 2 or weight.shape[0] != len(labels) or tuple(bias.shape) != (len(labels),):
        raise CheXNetLayoutError(
            f"{keys[0]} {tuple(weight.shape)} / {keys[1]} {tuple(bias.shape)}: expected {len(labels)} rows, one per "
            f"CheXNet finding ({', '.join(labels)})"
        )
    unknown = [name for name in ours if name not in labels]
    if unknown:
        raise CheXNetLayoutError(f"{keys[0]} has no row for {', '.join(unknown)}")
    rows = torch.tensor([labels.index(name) for name in ours])
    return weight[rows].clone(), bias[rows].clone()
