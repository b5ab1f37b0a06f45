"""Multi-task loss: BCE with per-finding positive weights on NIH rows, cross-entropy on COVID rows.

Each sample belongs to one source; the other head's labels are missing, not negative, so they are masked out.
Both terms are always computed (with zero weight when a batch has no row of a source) so every parameter gets
a gradient on every DDP rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NIH_SOURCE, COVID_SOURCE = 0, 1


def multitask_loss(
    logits: dict[str, torch.Tensor],
    source: torch.Tensor,
    nih_labels: torch.Tensor,
    covid_label: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (total loss, {"nih14": mean BCE over NIH rows, "covid": mean CE over COVID rows})."""
    nih_mask = (source == NIH_SOURCE).float()
    covid_mask = source == COVID_SOURCE
    targets = nih_labels * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else nih_labels
    bce = F.binary_cross_entropy_with_logits(logits["nih14"].float(), targets, pos_weight=pos_weight, reduction="none")
    nih_loss = (bce.mean(dim=1) * nih_mask).sum() / nih_mask.sum().clamp(min=1.0)
    safe_target = torch.where(covid_mask, covid_label, torch.zeros_like(covid_label))
    ce = F.cross_entropy(logits["covid"].float(), safe_target, reduction="none", label_smoothing=label_smoothing)
    covid_loss = (ce * covid_mask.float()).sum() / covid_mask.float().sum().clamp(min=1.0)
    return nih_loss + covid_loss, {"nih14": nih_loss.detach(), "covid": covid_loss.detach()}
