"""What every section of the configuration tree shares: the error type and the strict base model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from models.errors import CxrError


class ConfigError(CxrError, ValueError):
    """A configuration file, profile or override is invalid; the message names the dotted key."""


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
