"""Multi-task loss over the heads: BCE with per-class positive weights on multi-label heads, cross-entropy on
multi-class heads, each over the rows of its own source.

Each sample belongs to one source; the other heads' labels are missing, not negative, so they are masked out.
Every head's term is always computed (with zero weight when a batch has no row of its source) so every parameter
gets a gradient on every DDP rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from models.labels import LabelSpace, label_key


def head_loss(
    space: LabelSpace,
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean loss of one head over the rows ``mask`` selects (0 when it selects none)."""
    weights = mask.float()
    if space.multi_label:
        targets = labels * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else labels
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=pos_weight, reduction="none")
        per_row = bce.mean(dim=1)
    else:
        safe_target = torch.where(mask, labels, torch.zeros_like(labels))
        per_row = F.cross_entropy(logits.float(), safe_target, reduction="none", label_smoothing=label_smoothing)
    return (per_row * weights).sum() / weights.sum().clamp(min=1.0)


def multitask_loss(
    logits: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    spaces: Sequence[LabelSpace],
    pos_weights: Mapping[str, torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (sum of the heads' losses, {head: its mean loss over its own rows}).

    ``batch["source"]`` holds each row's index into ``spaces`` (the model's head order); ``batch[label_key(head)]``
    its labels for that head. ``pos_weights`` maps a multi-label head to its per-class BCE positive weights."""
    pos_weights = pos_weights or {}
    parts = {
        space.head: head_loss(
            space,
            logits[space.head],
            batch[label_key(space.head)],
            batch["source"] == index,
            pos_weights.get(space.head),
            label_smoothing,
        )
        for index, space in enumerate(spaces)
    }
    total = torch.stack(list(parts.values())).sum()
    return total, {head: value.detach() for head, value in parts.items()}
