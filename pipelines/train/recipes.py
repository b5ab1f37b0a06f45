"""Training recipes (plain torch, no ray): which epochs train the heads only, the optimizer's parameter groups and
freezing the backbone. ``train.recipe`` picks one:

- ``full``: every parameter trains every epoch (the backbone at ``lr x train.backbone_lr_scale``).
- ``linear_probe``: the backbone is frozen for the whole run and only the linear heads train; the sanity baseline
  ("does fine-tuning beat a frozen feature extractor").
- ``two_phase``: heads only for ``train.freeze_backbone_epochs`` epochs, then the whole network, the backbone
  usually at a lower learning rate.

A frozen backbone has ``requires_grad=False`` (no gradient, no optimizer update, no backward through it) and is in
eval mode while the heads train, so BatchNorm running statistics and dropout stay as they were.

DDP: ``DistributedDataParallel`` registers the parameters that require gradients *when it wraps the model*; a
parameter frozen then is left out of its all-reduce for good, so unfreezing it later under the same wrapper would
let every rank train its own backbone (tests/unit/test_recipes.py shows the backbone missing from DDP's buckets).
``enter_phase`` therefore wraps after deciding which parameters train, and wraps again at the switch. That costs
one broadcast of the parameters once per run, which is negligible, whereas the alternative (everything trainable,
the backbone's learning rate zero in phase one) would pay a full backward through the backbone and its all-reduce
on every heads-only step, and leave AdamW moments of phase one behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from models.checkpoint import unwrap
from pipelines.config import Config, ConfigError

log = logging.getLogger(__name__)

HEADS, ALL = "heads", "all"  # the two phases: heads only (backbone frozen), or the whole network


def phase_for_epoch(recipe: str, freeze_backbone_epochs: int, epoch: int) -> str:
    """The phase of ``epoch`` (0-based): a function of the epoch alone, so a resumed run lands in its phase."""
    if recipe == "linear_probe" or (recipe == "two_phase" and epoch < freeze_backbone_epochs):
        return HEADS
    return ALL


def check_recipe(cfg: Config, role: str) -> None:
    """Start-up check against the role's epoch budget (``model.<role>.epochs`` may replace ``train.epochs``)."""
    train = cfg.train
    if train.recipe == "two_phase" and train.freeze_backbone_epochs >= train.epochs:
        raise ConfigError(
            f"train.freeze_backbone_epochs ({train.freeze_backbone_epochs}) must be below the {role}'s epochs "
            f"({train.epochs}) with train.recipe=two_phase, or the backbone never trains; for that use "
            "train.recipe=linear_probe"
        )


def backbone_and_heads(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The backbone's parameters and all others (the heads), of a ``CxrNet`` or a wrapper around one."""
    net = unwrap(model)
    backbone = list(net.backbone.parameters())
    ids = {id(p) for p in backbone}
    return backbone, [p for p in net.parameters() if id(p) not in ids]


def param_groups(model: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """Optimizer groups, heads first (so ``get_last_lr()[0]`` is the heads' rate) then the backbone. Both groups
    exist in every recipe and phase: a frozen parameter has no gradient and the optimizer skips it, and a checkpoint's
    optimizer state loads whichever phase it was saved in."""
    backbone, heads = backbone_and_heads(model)
    return [
        {"name": "heads", "params": heads, "lr": lr},
        {"name": "backbone", "params": backbone, "lr": lr * backbone_lr_scale},
    ]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for param in unwrap(model).backbone.parameters():
        param.requires_grad_(trainable)


def enter_phase(model: nn.Module, phase: str, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Freeze or unfreeze the backbone for ``phase``, then (re)wrap the plain model with ``wrap`` (Ray Train's
    ``prepare_model``: DDP on several workers) so the wrapper syncs exactly the parameters that now train. Every
    rank calls this at the same epoch (the phase depends on the epoch only): wrapping is a collective."""
    net = unwrap(model)
    set_backbone_trainable(net, phase == ALL)
    return wrap(net)


def train_mode(model: nn.Module, phase: str) -> None:
    """``model.train()``, with a frozen backbone back in eval mode (BatchNorm statistics and dropout fixed)."""
    model.train()
    if phase == HEADS:
        unwrap(model).backbone.eval()
