"""Checkpoint format shared by training, evaluation, tuning and serving (plain torch, no ray).

A checkpoint directory holds ``checkpoint.pt`` (weights, optimizer, scheduler, epoch, config, label spaces,
preprocessing) and ``meta.json`` (the same minus tensors, for people and for tools that must not load torch).
``preprocessing`` says how an image becomes the model's input (``PreprocessSpec``: the size ingest stored it at,
then the input size), so evaluation, export and serving prepare images as training did without the config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.errors import CxrError
from models.labels import spaces_from_dicts
from models.network import CxrNet

CHECKPOINT_FILE = "checkpoint.pt"


def file_sha256(path: str | Path) -> str:
    """sha256 of a weights file (checkpoint or ONNX export), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(checkpoint_file: str | Path, info: dict[str, Any]) -> str:
    """Which weights answer: sha256 of the checkpoint file, the backend and the ONNX file's sha256 (when that
    backend sets it). Keys the serving result cache, so other weights never get an older model's answer."""
    parts = {
        "checkpoint_sha256": file_sha256(checkpoint_file),
        "backend": info.get("backend", "torch"),
        "onnx_sha256": info.get("onnx_sha256"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


META_FILE = "meta.json"
# The config schema's default storage size, for checkpoints written before they recorded theirs.
LEGACY_STORAGE_SIZE = 256


class CheckpointError(CxrError, FileNotFoundError):
    """A checkpoint path that does not hold a checkpoint of this project."""


@dataclass(frozen=True)
class PreprocessSpec:
    """decoded grayscale -> square at ``storage_size`` (as ingest stored it) -> ``input_size`` (the model's input)."""

    storage_size: int
    input_size: int

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any]) -> PreprocessSpec:
        """From a checkpoint's ``meta.json`` / payload (``preprocessing``; older checkpoints: the training config)."""
        pre = meta["preprocessing"]
        storage = pre.get("storage_size") or (meta.get("config") or {}).get("data", {}).get("storage_size")
        return cls(int(storage or LEGACY_STORAGE_SIZE), int(pre["input_size"]))


def unwrap(model: nn.Module) -> CxrNet:
    """The plain model inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model  # type: ignore[return-value]


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    *,
    role: str,
    epoch: int,
    config: dict[str, Any],
    metrics: dict[str, float],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: dict[str, Any] | None = None,
) -> Path:
    net = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "role": role,
        "arch": net.arch,
        "arch_options": net.options,
        "metadata_fusion": net.uses_metadata,
        "epoch": epoch,
        "label_spaces": [space.to_dict() for space in net.label_spaces],
        "preprocessing": {
            "input_size": net.input_size,
            "storage_size": (config.get("data") or {}).get("storage_size") or LEGACY_STORAGE_SIZE,
            "channels": 1,
            "input_dtype": "uint8",
            "mean": float(net.mean),
            "std": float(net.std),
        },
        "metrics": metrics,
        "state": state or {},
        "config": config,
    }
    payload = {
        **meta,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    torch.save(payload, directory / CHECKPOINT_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return directory


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CHECKPOINT_FILE} in {directory}: not a checkpoint of this project")
    return torch.load(path, map_location="cpu", weights_only=False)


def model_from_checkpoint(directory: str | Path, payload: dict[str, Any] | None = None) -> CxrNet:
    """Rebuild the network a checkpoint was trained as, with its weights, in eval mode."""
    payload = payload or load_checkpoint(directory)
    pre = payload["preprocessing"]
    model = CxrNet(
        payload["arch"],
        pre["input_size"],
        label_spaces_of(payload),
        mean=pre["mean"],
        std=pre["std"],
        options=payload.get("arch_options"),
        metadata=bool(payload.get("metadata_fusion")),
    )
    model.load_state_dict(payload["model"])
    return model.eval()


def label_spaces_of(meta: dict[str, Any]) -> tuple:
    """The label spaces a checkpoint's heads were built from, in head order."""
    spaces = meta["label_spaces"]
    if isinstance(spaces, dict):  # written before the dataset registry (two fixed heads)
        raise CheckpointError(
            "this checkpoint predates the dataset registry (label_spaces is a mapping of class lists); "
            "retrain it with this version"
        )
    return spaces_from_dicts(spaces)
