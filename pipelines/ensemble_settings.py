"""The ensemble's weights and gate threshold in use: `ensemble.yaml` from `cxr tune ensemble`, else the config.

`ensemble.yaml` (written by tune stage B, read by evaluation and serving)::

    w_cnn: 0.35                 # fusion weight of the CNN; the ViT gets 1 - w_cnn
    threshold: 0.9              # the CNN answers alone when its confidence >= threshold
    tuned_for:                  # the models the values were tuned on
      cnn: {checkpoint: /abs/path, registered_model: cxr-cnn/3}
      vit: {checkpoint: /abs/path, registered_model: cxr-vit/2}
    objective: {...}            # the tune.ensemble settings used
    validation: {...}           # the chosen point's validation figures
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Config

ENSEMBLE_FILE = "ensemble.yaml"


class EnsembleSettingsError(ValueError):
    """An ensemble.yaml that is unreadable or holds impossible values; the message names the file and key."""


@dataclass(frozen=True)
class EnsembleSettings:
    w_cnn: float
    threshold: float
    source: str  # the ensemble.yaml path, or "config" for ray_config.yaml's `ensemble:` section
    tuned_for: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"w_cnn": self.w_cnn, "threshold": self.threshold, "source": self.source, "tuned_for": self.tuned_for}


def default_path(cfg: Config) -> Path:
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
    for key, low, high in (("w_cnn", 0.0, 1.0), ("threshold", 0.0, 1.0)):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise EnsembleSettingsError(f"{path}: {key} must be a number in [{low}, {high}], got {value!r}")
        values[key] = float(value)
    return EnsembleSettings(source=str(path), tuned_for=data.get("tuned_for") or {}, **values)


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
