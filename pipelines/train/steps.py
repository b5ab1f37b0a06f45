"""Training and prediction steps over any iterable of batches (no ray): the Ray Train loop, evaluation and the
tests all call these. A batch is the dict ``iter_training_batches`` yields."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from models.losses import multitask_loss


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; no autocast on CPU (tiny models gain nothing there)."""
    if setting == "off" or device.type != "cuda":
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base learning rate, then cosine decay to zero, stepped once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    pos_weight: torch.Tensor | None = None,
    grad_clip: float = 1.0,
    label_smoothing: float = 0.0,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns mean loss, images seen and images/s."""
    model.train()
    total_loss, images, started = 0.0, 0, time.perf_counter()
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, dtype):
            logits = model(batch["image"])
        loss, _ = multitask_loss(
            logits, batch["source"], batch["nih_labels"], batch["covid_label"], pos_weight, label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        n = int(batch["image"].shape[0])
        total_loss += float(loss.detach()) * n
        images += n
    seconds = time.perf_counter() - started
    return {"loss": total_loss / max(1, images), "images": images, "images_per_s": images / max(seconds, 1e-9)}


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, np.ndarray]:
    """Probabilities of both heads for every sample, with the labels and source: the input of every metric."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("nih14", "covid", "source", "nih_labels", "covid_label")}
    for batch in batches:
        with autocast(device, dtype):
            logits = model(batch["image"].to(device, non_blocking=True))
        parts["nih14"].append(torch.sigmoid(logits["nih14"].float()).cpu().numpy())
        parts["covid"].append(torch.softmax(logits["covid"].float(), dim=1).cpu().numpy())
        for key in ("source", "nih_labels", "covid_label"):
            parts[key].append(batch[key].cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}
