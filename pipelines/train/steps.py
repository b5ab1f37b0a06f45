"""Training and prediction steps over any iterable of batches (no ray): the Ray Train loop, evaluation and the
tests all call these. A batch is the dict ``iter_training_batches`` yields."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from models.checkpoint import unwrap
from models.labels import label_key
from models.losses import multitask_loss
from pipelines.train.recipes import ALL, train_mode

T = TypeVar("T")


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
    """Linear warm-up to the base learning rate, then cosine decay to zero, stepped once per optimizer step (with
    gradient accumulation, once per ``grad_accum_steps`` batches)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def with_step_flags(batches: Iterable[T], every: int) -> Iterator[tuple[T, bool]]:
    """``(batch, step_after_it)``: True on every ``every``-th batch and on the last one (one batch of look-ahead),
    so a last partial group of micro-batches still steps, and is all-reduced first."""
    pending, count = None, 0
    for batch in batches:
        if count:
            yield pending, count % every == 0
        pending, count = batch, count + 1
    if count:
        yield pending, True


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None,
    rescale: float,
) -> None:
    """Clip, step the optimizer and the scheduler once. ``rescale`` turns the accumulated sum of loss / N gradients
    of a partial group of k < N micro-batches into their mean (N / k)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if rescale != 1.0:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(rescale)
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    pos_weights: dict[str, torch.Tensor] | None = None,
    grad_clip: float = 1.0,
    label_smoothing: float = 0.0,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_accum_steps: int = 1,
    phase: str = ALL,
) -> dict[str, float]:
    """One pass over ``batches``; returns mean loss, images seen, images/s and optimizer steps taken.

    Gradients of ``grad_accum_steps`` micro-batches are accumulated (each loss divided by that number) before one
    clipped optimizer and scheduler step; a DDP model (anything with ``no_sync``) skips the all-reduce on all but
    the last micro-batch of a group. ``phase`` ``heads`` keeps the (frozen) backbone in eval mode.
    ``pos_weights``: per multi-label head, its per-class BCE positive weights."""
    train_mode(model, phase)
    spaces = unwrap(model).label_spaces
    total_loss, images, steps, in_group, started = 0.0, 0, 0, 0, time.perf_counter()
    for batch, step in with_step_flags(batches, grad_accum_steps):
        if in_group == 0:
            optimizer.zero_grad(set_to_none=True)
        in_group += 1
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        skip_sync = not step and hasattr(model, "no_sync")
        with model.no_sync() if skip_sync else contextlib.nullcontext():  # forward and backward both inside
            with autocast(device, dtype):
                logits = model(batch["image"], batch.get("metadata"))
            loss, _ = multitask_loss(logits, batch, spaces, pos_weights, label_smoothing)
            scaled = loss / grad_accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if step:
            _optimizer_step(model, optimizer, scheduler, grad_clip, scaler, grad_accum_steps / in_group)
            steps, in_group = steps + 1, 0
        n = int(batch["image"].shape[0])
        total_loss += float(loss.detach()) * n
        images += n
    seconds = time.perf_counter() - started
    return {
        "loss": total_loss / max(1, images),
        "images": images,
        "images_per_s": images / max(seconds, 1e-9),
        "optimizer_steps": steps,
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | None = None,
    use_metadata: bool = True,
) -> dict[str, np.ndarray]:
    """Every head's probabilities for every sample (``{head: [N, K]}``, sigmoid or softmax as its label space
    says), with ``source`` and each head's labels (``label_<head>``, as in the batches): the input of every metric.

    ``use_metadata=False`` hides the batches' patient metadata from a fusion model (every row "missing"): the same
    rows with and without it, for evaluation's comparison. Models without the fusion head ignore it either way."""
    model.eval()
    spaces = unwrap(model).label_spaces
    keys = [space.head for space in spaces] + ["source"] + [label_key(space.head) for space in spaces]
    parts: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for batch in batches:
        metadata = batch.get("metadata") if use_metadata else None
        with autocast(device, dtype):
            logits = model(batch["image"].to(device, non_blocking=True), metadata)
        for space in spaces:
            parts[space.head].append(space.probabilities(logits[space.head]).cpu().numpy())
        for key in keys[len(spaces) :]:
            parts[key].append(batch[key].cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}
