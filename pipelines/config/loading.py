"""Loading the configuration: ``ray_config.yaml`` <- a profile <- ``--set dotted.key=value`` overrides, validated.

Any unknown key, wrong type or impossible value raises ``ConfigError`` naming the dotted key path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.config.schema import Config, ConfigError

DEFAULT_CONFIG_PATH = Path("ray_config.yaml")


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(tree: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: is a value, cannot set {key.strip()}")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {path}: {msg} (got {item.get('input')!r})")
    return f"invalid configuration in {source}:\n" + "\n".join(lines)


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a plain dict (the form in which config crosses into Ray workers)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(
    path: str | Path | None = DEFAULT_CONFIG_PATH, profile: str | None = None, sets: list[str] | None = None
) -> Config:
    """Load ``path`` (or the built-in defaults when None), apply a profile and overrides, and validate."""
    tree: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        tree, source = loaded, str(path)
    profiles = tree.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: profiles: expected a mapping of profile names")
    if profile:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"{source}: unknown profile {profile!r} (profiles defined: {known})")
        tree = _deep_merge(tree, profiles[profile] or {})
        source = f"{source} (profile {profile})"
    for assignment in sets or []:
        tree = apply_override(tree, assignment)
    return config_from_dict(tree, source)


def profile_names(path: str | Path = DEFAULT_CONFIG_PATH) -> list[str]:
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    return sorted(loaded.get("profiles") or {})
