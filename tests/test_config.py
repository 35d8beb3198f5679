"""Typed configs: defaults, YAML, overrides, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from gedi_nesy.config import (
    GediConfig,
    GediRunConfig,
    JointConfig,
    ModelConfig,
    NesyRunConfig,
    OptimConfig,
    SupervisionConfig,
)
from gedi_nesy.errors import ConfigError
from gedi_nesy.schema import load_config, to_dict, with_defaults

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
        ("optim.max_steps=1.5", "optim.max_steps = 1.5 (float) must be of type int"),
        ("optim.max_steps=true", "optim.max_steps = True (bool) must be of type int"),
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


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ModelConfig(k=1), "model.k = 1; it must be a finite number >= 2"),
        (lambda: ModelConfig(tau=0.0), "model.tau = 0.0; it must be a finite number > 0"),
        (lambda: ModelConfig(head="mlp"), "model.head = 'mlp' is not allowed"),
        (lambda: GediConfig(w_gen=float("nan")), "gedi.w_gen = nan; it must be a finite number"),
        (lambda: GediConfig(w_prior=-1.0), "gedi.w_prior = -1.0; it must be a finite number >= 0"),
        (lambda: GediConfig(prior_target=[0.5, 0.6]), "gedi.prior_target = [0.5, 0.6]: it must"),
        (
            lambda: OptimConfig(batch_size=0),
            "optim.batch_size = 0; it must be a finite number >= 1",
        ),
        (lambda: OptimConfig(log_every=0), "optim.log_every = 0; it must be"),
        (lambda: OptimConfig(epochs=None), "optim.epochs and optim.max_steps are both null"),
        (lambda: OptimConfig(relabel_every=-1), "optim.relabel_every = -1; it must be"),
        (lambda: OptimConfig(gedi_only_steps=-2), "optim.gedi_only_steps = -2; it must be"),
        (
            lambda: OptimConfig(relabel_min_share=-0.1),
            "optim.relabel_min_share = -0.1; it must be a finite number in [0, 1]",
        ),
        (lambda: SupervisionConfig(labels_per_class=-1), "supervision.labels_per_class = -1"),
        (
            lambda: JointConfig(
                GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0), optim=OptimConfig(gedi_only_steps=5)
            ),
            "optim.gedi_only_steps = 5: it must be >= 0, and > 0 only with a GEDI weight > 0",
        ),  # fmt: skip
        (
            lambda: GediRunConfig(model=ModelConfig(clusters_per_value=2)),
            "model.clusters_per_value = 2: standalone GEDI has no values",
        ),
        (
            lambda: GediRunConfig(optim=OptimConfig(patience=3)),
            "optim.patience = 3 applies to joint training (gedi-nesy train) only",
        ),
    ],
)
def test_settings_are_checked_by_the_config_in_one_line(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_joint_defaults_are_the_one_optimiser_config_and_the_run_checks_its_sections():
    cfg = load_config(None, NesyRunConfig, ["data.root=/somewhere", "optim.epochs=3"])
    assert cfg.data.root == "/somewhere" and cfg.optim == OptimConfig(epochs=3)
    assert cfg.joint == JointConfig(cfg.gedi, cfg.sgld, cfg.augment, cfg.optim,
                                    cfg.supervision, cfg.logic)  # fmt: skip
    with pytest.raises(ConfigError, match="unknown config key 'data_root'"):
        load_config(None, NesyRunConfig, ["data_root=/somewhere"])
    with pytest.raises(
        ConfigError, match="unknown config key 'data.n_train'; allowed keys in data: root"
    ):
        load_config(None, NesyRunConfig, ["data.n_train=5"])
    off = ["gedi.w_gen=0", "gedi.w_inv=0", "gedi.w_prior=0", "optim.gedi_only_steps=5"]
    with pytest.raises(ConfigError, match="optim.gedi_only_steps = 5"):
        load_config(None, NesyRunConfig, off)
    # a saved config still compares equal to the config that made it
    assert with_defaults(NesyRunConfig, to_dict(cfg)) == to_dict(cfg)


def test_gedi_weights_follow_the_method():
    assert GediConfig(w_gen=0.0, energy_reg=0.5).part_weights()["energy_reg"] == 0.0
    swav = GediConfig(method="swav", w_inv=0.5).part_weights()
    assert swav == {"gen": 0.0, "energy_reg": 0.0, "inv": 0.0, "prior": 0.0, "swav": 0.5}
    jem = GediConfig(method="jem", w_gen=0.1, energy_reg=0.01).part_weights()
    assert jem == {"gen": 0.1, "energy_reg": 0.01, "inv": 0.0, "prior": 0.0, "swav": 0.0}
    assert not GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0).trains_terms()
