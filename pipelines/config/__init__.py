"""The one typed configuration tree every stage reads, loaded from ``ray_config.yaml``.

A YAML file holds the production defaults at the top level and named partial trees under ``profiles:``.
``load_config(path, profile, sets)`` merges base <- profile <- ``--set dotted.key=value`` overrides and
validates the result; any unknown key, wrong type or impossible value raises ``ConfigError`` naming the
dotted key path. Crossing into Ray, the tree travels as ``cfg.model_dump(mode="json")`` and workers rebuild it
with ``Config.model_validate``.
"""

from pipelines.config.loading import DEFAULT_CONFIG_PATH, apply_override, config_from_dict, load_config, profile_names
from pipelines.config.schema import (
    PROJECT_ROOT_ENV,
    AugmentConfig,
    CacheConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    DeploymentConfig,
    EnsembleConfig,
    EnsembleTuneConfig,
    EvaluateConfig,
    ExportConfig,
    MlflowConfig,
    ModelConfig,
    OodConfig,
    RouterConfig,
    ServeConfig,
    SynthConfig,
    TrainConfig,
    TuneConfig,
    project_root,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "PROJECT_ROOT_ENV",
    "AugmentConfig",
    "CacheConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeploymentConfig",
    "EnsembleConfig",
    "EnsembleTuneConfig",
    "OodConfig",
    "EvaluateConfig",
    "ExportConfig",
    "MlflowConfig",
    "ModelConfig",
    "RouterConfig",
    "ServeConfig",
    "SynthConfig",
    "TrainConfig",
    "TuneConfig",
    "apply_override",
    "config_from_dict",
    "load_config",
    "profile_names",
    "project_root",
]
