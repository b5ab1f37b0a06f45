"""Where the project's artefacts live and which one is the latest: one module writes and reads them all.

- ``<train.run_dir>/latest-<role>.json``: the last ``cxr train --model <role>`` (best checkpoint, metrics, MLflow run).
  A linear probe (``train.recipe=linear_probe``) writes ``latest-<role>-probe.json`` instead, so ``latest-<role>.json``
  always means a model trained end to end, the one tuning, serving and evaluation's ``<role>`` row use.
- ``<export.out_dir>/latest-<role>.json``: the last ``cxr export --model <role>`` (the newest ONNX file, its sha256).
- ``<train.run_dir>/ensemble.yaml``: the gate's weights and threshold from ``cxr tune ensemble``, read by evaluation
  and serving; without it the config's ``ensemble:`` section holds.
- the MLflow tracking URI: ``mlflow.tracking_uri``, else a SQLite store under ``train.run_dir``.

This module reads JSON, YAML and the check's NumPy file only (no Ray, torch or MLflow), so the Serve app builder can
use it cheaply.

`ensemble.yaml` (written by tune stage B)::

    w_cnn: 0.35                 # fusion weight of the CNN; the ViT gets 1 - w_cnn
    threshold: 0.9              # the CNN answers alone when its confidence >= threshold
    tuned_for:                  # the models the values were tuned on
      cnn: {checkpoint: /abs/path, registered_model: cxr-cnn/3}
      vit: {checkpoint: /abs/path, registered_model: cxr-vit/2}
    temperatures: {cnn: {nih14: 0.94, ...}, vit: {...}}   # per model and head (models/calibration.py)
    refer_below: 0.51           # answers less confident than this say "refer"
    ood: {detector: ood.npz, threshold: 4.2, ...}       # the out-of-distribution check, its file beside this one
    objective: {...}            # the tune.ensemble settings used
    validation: {...}           # the chosen point's validation figures
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.errors import CxrError
from models.ood import OodDetector
from pipelines.config import Config

ENSEMBLE_FILE = "ensemble.yaml"


class ArtifactNotFoundError(CxrError, FileNotFoundError):
    """No pointer of the kind asked for: the message says which command writes it."""


class EnsembleSettingsError(CxrError, ValueError):
    """An ensemble.yaml that is unreadable or holds impossible values; the message names the file and key."""


@dataclass(frozen=True)
class EnsembleSettings:
    w_cnn: float
    threshold: float
    source: str  # the ensemble.yaml path, or "config" for ray_config.yaml's `ensemble:` section
    tuned_for: dict[str, Any] = field(default_factory=dict)
    # per role and head, the temperature stage B fitted on the validation split (models/calibration.py); none: 1.0
    temperatures: dict[str, dict[str, float]] = field(default_factory=dict)
    refer_below: float = 0.0  # an answer less confident than this says "refer" (stage B's floor; 0: never)
    # stage B's out-of-distribution check (tune/ood_fit.py): its record, ``detector`` an absolute path; none: no check
    ood: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "w_cnn": self.w_cnn,
            "threshold": self.threshold,
            "source": self.source,
            "tuned_for": self.tuned_for,
            "temperatures": self.temperatures,
            "refer_below": self.refer_below,
            "ood": self.ood,
        }

    def ood_detector(self) -> OodDetector | None:
        """The out-of-distribution check stage B fitted with these settings, or None when it has none."""
        if not self.ood:
            return None
        path = Path(self.ood["detector"])
        try:
            return OodDetector.load(path)
        except (OSError, KeyError, ValueError) as err:
            raise EnsembleSettingsError(f"{self.source}: ood.detector {path} cannot be read: {err}") from err


def tracking_uri(cfg: Config) -> str:
    """``mlflow.tracking_uri``, else a SQLite store at ``<train.run_dir>/mlflow.db`` (the folder is created)."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    run_dir = Path(cfg.train.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}"


# ------------------------------------------------------------------------ training and export pointers


# Recipes whose runs are a variant of their role, recorded under their own pointer: a baseline, not the model.
VARIANTS = {"linear_probe": "probe"}


def training_key(role: str, recipe: str = "full") -> str:
    """The name a training run's pointer goes by: ``<role>`` (``full``, ``two_phase``) or ``<role>-probe``."""
    variant = VARIANTS.get(recipe)
    return f"{role}-{variant}" if variant else role


def _train_command(key: str) -> str:
    role, _, variant = key.partition("-")
    recipes = [recipe for recipe, name in VARIANTS.items() if name == variant]
    return f"cxr train --model {role}" + (f" --set train.recipe={recipes[0]}" if recipes else "")


def training_pointer(cfg: Config, role: str) -> Path:
    """``role``: a role, or a key from ``training_key`` (``cnn-probe``)."""
    return Path(cfg.train.run_dir) / f"latest-{role}.json"


def export_pointer(cfg: Config, role: str) -> Path:
    return Path(cfg.export.out_dir) / f"latest-{role}.json"


def _write_json(path: Path, body: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(body, indent=2))
    tmp.replace(path)  # a reader never sees half a file
    return path


def write_latest_training(cfg: Config, role: str, summary: dict[str, Any]) -> Path:
    return _write_json(training_pointer(cfg, role), summary)


def write_latest_export(cfg: Config, role: str, summary: dict[str, Any]) -> Path:
    return _write_json(export_pointer(cfg, role), summary)


def latest_training(cfg: Config, role: str) -> dict[str, Any]:
    """The summary the last ``cxr train --model <role>`` wrote: how evaluation, tuning, export and serving find
    the best checkpoint (``best_checkpoint``) and its MLflow run."""
    path = training_pointer(cfg, role)
    if not path.is_file():
        raise ArtifactNotFoundError(f"{path} not found: run `{_train_command(role)}` first or pass a checkpoint path")
    return json.loads(path.read_text())


def latest_checkpoint(cfg: Config, role: str) -> Path:
    return Path(latest_training(cfg, role)["best_checkpoint"])


def latest_probes(cfg: Config, roles: tuple[str, ...] = ("cnn", "vit")) -> list[Path]:
    """The best checkpoints of the last linear probe of each role that has one (none: an empty list)."""
    keys = [training_key(role, "linear_probe") for role in roles]
    return [latest_checkpoint(cfg, key) for key in keys if training_pointer(cfg, key).is_file()]


def latest_export(cfg: Config, role: str) -> dict[str, Any]:
    """What the last ``cxr export --model <role>`` wrote: ``path`` (the newest model), ``sha256``, parity, ..."""
    path = export_pointer(cfg, role)
    if not path.is_file():
        raise ArtifactNotFoundError(f"{path} not found: run `cxr export --model {role} --format onnx` first")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------ ensemble settings


def default_path(cfg: Config) -> Path:
    """``<train.run_dir>/ensemble.yaml``, where tune stage B writes and evaluation and serving look."""
    return Path(cfg.train.run_dir) / ENSEMBLE_FILE


def read_settings(path: str | Path) -> EnsembleSettings:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EnsembleSettingsError(f"{path}: cannot read ensemble settings: {err}") from err
    if not isinstance(data, dict):
        raise EnsembleSettingsError(f"{path}: expected a mapping with w_cnn and threshold")
    values = {}
    for key, low, high in (("w_cnn", 0.0, 1.0), ("threshold", 0.0, 1.0), ("refer_below", 0.0, 1.0)):
        value = data.get(key, 0.0 if key == "refer_below" else None)  # older files have no floor: never refer
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise EnsembleSettingsError(f"{path}: {key} must be a number in [{low}, {high}], got {value!r}")
        values[key] = float(value)
    temperatures: dict[str, dict[str, float]] = {}
    for role, heads in (data.get("temperatures") or {}).items():
        for head, value in (heads or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                what = f"temperatures.{role}.{head}"
                raise EnsembleSettingsError(f"{path}: {what} must be a positive number, got {value!r}")
            temperatures.setdefault(role, {})[head] = float(value)
    tuned_for = data.get("tuned_for") or {}
    ood = dict(data.get("ood") or {})  # older files have none: no check
    if ood:
        if not isinstance(ood.get("detector"), str):
            raise EnsembleSettingsError(f"{path}: ood.detector must name the check's file, got {ood.get('detector')!r}")
        ood["detector"] = str((path.parent / ood["detector"]).resolve())
    return EnsembleSettings(source=str(path), tuned_for=tuned_for, temperatures=temperatures, ood=ood, **values)


def load_settings(cfg: Config, path: str | Path | None = None) -> EnsembleSettings:
    """An explicit path must exist; otherwise `<train.run_dir>/ensemble.yaml` if present, else the config."""
    if path is not None:
        return read_settings(path)
    if default_path(cfg).is_file():
        return read_settings(default_path(cfg))
    return EnsembleSettings(w_cnn=cfg.ensemble.w_cnn, threshold=cfg.ensemble.threshold, source="config")


def write_settings(path: str | Path, w_cnn: float, threshold: float, **extra: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"w_cnn": float(w_cnn), "threshold": float(threshold), **extra}
    tmp = path.with_suffix(".yaml.partial")
    tmp.write_text(yaml.safe_dump(body, sort_keys=False))
    tmp.replace(path)
    return path
