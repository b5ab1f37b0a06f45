"""The Ray Train worker loop: a short wrapper around ``train_epoch`` / ``predict`` that adds DDP, dataset
shards, checkpoints, resume, early stopping, the recipe's phases (pipelines/train/recipes.py) and (on rank 0)
MLflow."""

from __future__ import annotations

import logging
import math
import tempfile
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from models.checkpoint import load_checkpoint, save_checkpoint, unwrap
from models.factory import build_model
from models.labels import spaces_from_dicts
from pipelines.config import Config, config_from_dict
from pipelines.data.streaming import iter_training_batches
from pipelines.evaluate.metrics import headline
from pipelines.train import recipes, tracking
from pipelines.train.steps import amp_dtype, predict, train_epoch, warmup_cosine

log = logging.getLogger(__name__)


def _console() -> logging.Logger:
    """Per-epoch lines on the worker's stdout, which Ray forwards to the driver and the job logs."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _gather(predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank predicted its own part of the validation split; every rank gets all of it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return predictions
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, predictions)
    return {k: np.concatenate([p[k] for p in parts if len(p[k])]) for k in predictions}


def _val_line(val: dict[str, float], heads: list[str]) -> str:
    """Per-epoch validation figures by head: ``nih14 macro_auroc 0.612 abnormal_auroc 0.701 | covid ... | score``."""
    groups = []
    for head in heads:
        figures = {k.removeprefix(f"{head}_"): v for k, v in val.items() if k.startswith(f"{head}_")}
        groups.append(head + " " + " ".join(f"{name} {value:.3f}" for name, value in figures.items()))
    return " | ".join(groups + [f"score {val['score']:.3f}"])


def _build(cfg: Config, role: str, info: dict[str, Any], steps_per_epoch: int):
    arch = getattr(cfg.model, role)
    model = build_model(
        arch.name, cfg.model.input_size, spaces_from_dicts(info["label_spaces"]), cfg.model.mean, cfg.model.std,
        arch.drop_rate, arch.pretrained, arch.options, arch.metadata,
    )  # fmt: skip
    groups = recipes.param_groups(model, cfg.train.lr, cfg.train.backbone_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = round(cfg.train.warmup_epochs * steps_per_epoch)
    scheduler = warmup_cosine(optimizer, warmup, cfg.train.epochs * steps_per_epoch)
    return model, optimizer, scheduler


def _resume(model, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
    """Continue from the run's latest checkpoint (same run name, or a restart after a worker failure)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {"best_score": -math.inf, "bad_epochs": 0, "mlflow_run_id": None}
    with checkpoint.as_directory() as directory:
        payload = load_checkpoint(directory)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    return payload["epoch"] + 1, payload["state"]


def _enter_phase(cfg: Config, model, phase: str | None, epoch: int, rank: int):
    """(Re)wrap the model when ``epoch`` starts a new phase (or is the first of this process); rank 0 logs it."""
    wanted = recipes.phase_for_epoch(cfg.train.recipe, cfg.train.freeze_backbone_epochs, epoch)
    if wanted == phase:
        return model, phase
    model = recipes.enter_phase(model, wanted, ray.train.torch.prepare_model)
    if rank == 0 and cfg.train.recipe != "full":
        tracking.log_phase(wanted, epoch)
        what = "heads only, backbone frozen" if wanted == recipes.HEADS else "whole network"
        _console().info("[%s] epoch %d: %s phase (%s)", cfg.train.recipe, epoch + 1, wanted, what)
    return model, wanted


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = config_from_dict(loop_config["config"])
    role, info = loop_config["role"], loop_config["info"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    batch_size, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    batches_per_epoch = max(1, math.ceil(info["train_rows"] / (batch_size * world)))
    steps_per_epoch = math.ceil(batches_per_epoch / accum)  # optimizer steps: the scheduler's unit
    model, optimizer, scheduler = _build(cfg, role, info, steps_per_epoch)
    start_epoch, state = _resume(model, optimizer, scheduler)
    phase = None  # wrapped for the phase of the first epoch below (a resumed run: the phase it stopped in)
    dtype = amp_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    spaces = spaces_from_dicts(info["label_spaces"])
    pos_weights = {
        space.head: torch.tensor([info["positive_weights"][space.head][name] for name in space.classes], device=device)
        for space in spaces
        if space.head in info["positive_weights"]
    }
    if rank == 0:
        state["mlflow_run_id"] = tracking.start_run(
            cfg, loop_config["run_name"], role, state.get("mlflow_run_id"), loop_config.get("mlflow_tags")
        )
        if start_epoch:
            _console().info("resuming %s from its checkpoint of epoch %d", loop_config["run_name"], start_epoch)
    for epoch in range(start_epoch, cfg.train.epochs):
        model, phase = _enter_phase(cfg, model, phase, epoch, rank)
        train_batches = iter_training_batches(
            ray.train.get_dataset_shard("train"), batch_size, device, shuffle_buffer=4 * batch_size, drop_last=True
        )
        stats = train_epoch(
            model, train_batches, optimizer, scheduler, device, pos_weights, cfg.train.grad_clip,
            cfg.train.label_smoothing, dtype, scaler, accum, phase,
        )  # fmt: skip
        val_batches = iter_training_batches(ray.train.get_dataset_shard("val"), 2 * batch_size, device)
        val = headline(_gather(predict(unwrap(model), val_batches, device, dtype)), spaces)
        improved = val["score"] > state["best_score"]
        state["best_score"] = max(state["best_score"], val["score"])
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        # two_phase: the heads-only epochs never stop the run early, the backbone gets its turn
        heads_first = cfg.train.recipe == "two_phase" and phase == recipes.HEADS
        stop = state["bad_epochs"] >= cfg.train.early_stopping_patience and not heads_first
        metrics = {
            "epoch": epoch,
            "train_loss": stats["loss"],
            "images_per_s_per_worker": stats["images_per_s"],
            "lr": scheduler.get_last_lr()[0],  # the heads' (param_groups puts them first)
            "lr_backbone": scheduler.get_last_lr()[1],
            "backbone_trainable": phase == recipes.ALL,
            **{f"val_{k}": v for k, v in val.items()},
            "resumed_from_epoch": start_epoch,
            "early_stopped": stop,
            "mlflow_run_id": state["mlflow_run_id"] or "",
        }
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                save_checkpoint(
                    directory, model, role=role, epoch=epoch, config=loop_config["config"], metrics=val,
                    optimizer=optimizer, scheduler=scheduler, state=state,
                )  # fmt: skip
                checkpoint = ray.train.Checkpoint.from_directory(directory)
                tracking.log_epoch({k: v for k, v in metrics.items() if k != "epoch"}, epoch)
                _console().info(
                    "[%s] epoch %d/%d  loss %.4f  val %s  %.0f img/s/worker",
                    role, epoch + 1, cfg.train.epochs, stats["loss"], _val_line(val, [s.head for s in spaces]),
                    stats["images_per_s"],
                )  # fmt: skip
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break
    if rank == 0:
        tracking.end_run()
