"""Typed configs: defaults, YAML, overrides, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from gedi_nesy.config import GediRunConfig, load_config, to_dict
from gedi_nesy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("gedi*.yaml")) + [ROOT / "configs/smoke.yaml"]:
        cfg = load_config(path, GediRunConfig)
        assert cfg.model.k == 10


def test_overrides_are_typed():
    overrides = ["optim.lr=1e-3", "augment.scale=[0.9, 1.1]", "data.n_train=100",
                 "gedi.symmetric_inv=true"]  # fmt: skip
    cfg = load_config(None, GediRunConfig, overrides)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.augment.scale == (0.9, 1.1)
    assert cfg.data.n_train == 100 and cfg.gedi.symmetric_inv is True
    assert to_dict(cfg)["augment"]["scale"] == [0.9, 1.1]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; allowed keys in optim: batch_size"),
        ("colour=red", "unknown config key 'colour'; allowed keys in the top level: augment"),
        ("model.head=mlp", "model.head = 'mlp' is not allowed; use one of 'cosine', 'linear'"),
        ("optim.steps=1.5", "optim.steps = 1.5 (float) must be of type int"),
        ("optim.steps=true", "optim.steps = True (bool) must be of type int"),
        ("optim=3", "optim must be a mapping of keys, got 3"),
        ("no_equals_sign", "is not of the form key.sub=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, GediRunConfig, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", GediRunConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad, GediRunConfig)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy, GediRunConfig)
