"""Config loading: every shipped YAML validates; bad keys, types and values fail with the dotted path."""

from __future__ import annotations

import pytest
import yaml

from pipelines.config import Config, ConfigError, load_config, profile_names
from tests.helpers import ROOT

SHIPPED_CONFIGS = sorted(p for p in ROOT.glob("**/*.y*ml") if ".venv" not in p.parts and "runs" not in p.parts)


def test_shipped_yaml_files_are_found():
    assert ROOT / "ray_config.yaml" in SHIPPED_CONFIGS


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path):
    tree = yaml.safe_load(path.read_text())
    assert isinstance(tree, dict)
    if path.name == "ray_config.yaml":
        for profile in [None, *profile_names(path)]:
            assert isinstance(load_config(path, profile), Config)


def test_production_defaults_and_demo_profile():
    prod = load_config(ROOT / "ray_config.yaml")
    assert (prod.model.cnn.name, prod.model.vit.name, prod.model.input_size) == (
        "efficientnet_b0",
        "vit_small_patch16_224",
        224,
    )
    assert (prod.ensemble.w_cnn, prod.ensemble.threshold, prod.train.use_gpu) == (0.4, 0.85, "auto")
    demo = load_config(ROOT / "ray_config.yaml", "demo")
    assert (demo.model.cnn.name, demo.model.vit.name, demo.model.input_size) == ("test_efficientnet", "test_vit", 64)
    assert demo.train.use_gpu is False and demo.train.amp == "off"


def test_an_architecture_epoch_budget_replaces_train_epochs_for_that_role_only():
    from pipelines.train.driver import for_role

    demo = load_config(ROOT / "ray_config.yaml", "demo", ["train.epochs=3", "model.vit.epochs=7"])
    assert (for_role(demo, "cnn").train.epochs, for_role(demo, "vit").train.epochs) == (3, 7)
    assert for_role(demo, "vit").train.lr == demo.train.lr


def test_set_overrides_parse_yaml_values():
    cfg = load_config(ROOT / "ray_config.yaml", "demo", ["train.lr=1e-4", "data.augment.clahe=true"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.augment.clahe is True


@pytest.mark.parametrize(
    ("override", "dotted"),
    [
        ("train.batch_size=-4", "train.batch_size"),
        ("ensemble.threshold=1.5", "ensemble.threshold"),
        ("data.synth.seed=abc", "data.synth.seed"),
        ("serve.cnn.bogus=1", "serve.cnn.bogus"),
        ("train.amp=fp8", "train.amp"),
        ("tune.ensemble.head_weights={nih: 2}", "tune.ensemble.head_weights"),  # a head, not a source
        ("tune.ensemble.head_weights={covid: -1}", "tune.ensemble.head_weights"),
        ("model.cnn.metadata=maybe", "model.cnn.metadata"),
    ],
)
def test_bad_values_name_the_dotted_key(override, dotted):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "ray_config.yaml", None, [override])
    assert f"{dotted}:" in str(err.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key"):
        load_config(path)


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="lr_min"):
        load_config(None, sets=["tune.lr_min=0.1", "tune.lr_max=0.01"])
    with pytest.raises(ConfigError, match="serve.cnn"):
        load_config(None, sets=["serve.cnn.min_replicas=3", "serve.cnn.max_replicas=2"])


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*demo"):
        load_config(ROOT / "ray_config.yaml", "nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, sets=["no-equals-sign"])
