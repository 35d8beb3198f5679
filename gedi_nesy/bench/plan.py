"""Planning a bench: its config, its trials and the ``gedi-nesy train`` config of each trial.

A bench config names a base run config (the ``gedi-nesy train`` format), the methods as overrides
of it, the seeds and optionally a data-size axis. Every (method, size, seed) is a *trial*, named
``<method>[-n<size>]-s<seed>[-r<restart>]``; its folder is ``<out_dir>/<name>/trials/<trial>/``.

Recipes: a method (or the base) may say ``extends: recipes/shortcut_gedi.yaml``, a run-config
fragment holding a method's current recipe; its settings apply first, then the method's own keys
(see :func:`gedi_nesy.schema.load_config`). A whole bench file may extend another bench file.

With ``restarts: R`` > 1 each (method, size, seed) trains R times, restart r setting
``restart_key`` (default ``optim.seed``: the model, not the data) to ``seed + 1000 r``; the report
keeps one restart per seed (:mod:`gedi_nesy.bench.report`).

With ``band:`` the bench runs, instead of its methods, each band method with one key scaled at a
time: ``band: {methods: [dpl+gedi], keys: [gedi.w_inv], factors: [0.5, 2]}`` runs the methods
``w_inv_x0.5`` and ``w_inv_x2``, ``dpl+gedi`` with ``gedi.w_inv`` halved and doubled (the value
scaled is the one the method's trials would use, its default included). With two or more band
methods the names carry the method: ``dpl+gedi@w_inv_x0.5``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gedi_nesy.config import NesyRunConfig, check_name
from gedi_nesy.errors import ConfigError, StorageError
from gedi_nesy.schema import from_dict, with_defaults
from gedi_nesy.shortcuts.metrics import reads_concept_labels
from gedi_nesy.train.runtime import config_difference

# metric key in metrics.json -> column heading of summary.md
DEFAULT_COLUMNS = {
    "test_task_acc": "Acc(Y)",
    "acc_c": "raw Acc(C)",
    "acc_c_matched": "matched Acc(C)",
    "nmi_c": "NMI(C)",
    "f1_c_macro": "F1(C) macro",
    "collapse_hard": "Cls hard",
    "train_min_usage_c": "min usage (train, no labels)",
    "ood_task_acc": "OOD Acc(Y)",
    "ood_acc_c": "OOD raw Acc(C)",
    "train_seconds": "train s",
}
RESTART_STRIDE = 1000


@dataclass
class BandConfig:
    """How wide is a method's band: each of ``keys`` scaled by each of ``factors``, one at a time,
    the method's other settings kept."""

    methods: list[str] = field(default_factory=list)  # methods of the bench to vary
    keys: list[str] = field(default_factory=lambda: ["gedi.w_gen", "gedi.w_inv", "gedi.w_prior"])
    factors: list[float] = field(default_factory=lambda: [0.5, 2.0])  # halved and doubled


@dataclass
class BenchConfig:
    """A comparison: ``base`` run config, ``methods`` as overrides of it, seeds and sizes.

    Method overrides are mappings of dotted keys (``gedi.w_inv: 0``) or nested sections
    (``gedi: {w_inv: 0}``). Each seed sets every key in ``seed_keys``; each size sets
    ``size_key``. Everything else a trial needs comes from ``base``.
    """

    name: str = "bench"
    out_dir: str = "runs"
    base: dict[str, Any] = field(default_factory=dict)  # a `gedi-nesy train` config mapping
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> overrides of base
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_keys: list[str] = field(default_factory=lambda: ["task.seed", "optim.seed"])
    size_key: str | None = None  # dotted key of the data-size axis, e.g. task.n_train
    sizes: list[int] = field(default_factory=list)  # its values; empty: base's own size
    columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    restarts: int = 1  # runs per (method, size, seed); the report keeps one, by select_by
    restart_key: str = "optim.seed"  # restart r sets it to seed + RESTART_STRIDE * r
    select_by: str = "train_min_usage_c"  # metric maximised to pick a restart (no labels)
    band: BandConfig | None = None  # None: run the methods; else their band variants instead


@dataclass(frozen=True)
class Trial:
    """One run of the bench: a method at a data size (None: the base's) with a seed, and which
    restart of it (0 unless the bench has ``restarts`` > 1)."""

    method: str
    size: int | None
    seed: int
    restart: int = 0

    @property
    def name(self) -> str:
        size = "" if self.size is None else f"-n{self.size}"
        restart = "" if self.restart == 0 else f"-r{self.restart}"
        return f"{self.method}{size}-s{self.seed}{restart}"


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree[a][b] = value`` for ``key = "a.b"``, creating sections on the way.

    Args:
        tree: nested mappings, changed in place.
        key: the dotted key.
        value: the value to set.

    Raises:
        ConfigError: a part of the key on the way is a value, not a section.
    """
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"bench key {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def _flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _apply(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``overrides`` set, in order."""
    raw = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        set_dotted(raw, key, copy.deepcopy(value))
    return raw


def bench_methods(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """The methods the bench runs, each as its dotted overrides of ``base``, in run order: the
    config's methods, or with a ``band`` the band variants instead.

    Args:
        cfg: the bench config.

    Returns:
        Method name -> {dotted key: value}.

    Raises:
        ConfigError: a method that is not a name and a mapping, or a band that names unknown
            methods, repeats a key or a factor, or scales a value that is not a non-zero number.
    """
    for method, overrides in cfg.methods.items():
        check_name("bench method", method)
        if not isinstance(overrides, Mapping):
            raise ConfigError(
                f"bench method {method!r} = {overrides!r}: a method is a mapping of overrides, "
                "e.g. dpl: {gedi.w_inv: 0}"
            )
    flat = {method: _flatten(overrides) for method, overrides in cfg.methods.items()}
    return flat if cfg.band is None else _band_variants(cfg.band, cfg.base, flat)


def _band_variants(
    band: BandConfig, base: Mapping[str, Any], methods: Mapping[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each band method with one key scaled at a time (method, then key, then factor)."""
    leaves = [key.rsplit(".", 1)[-1] for key in band.keys]
    if not band.methods or any(m not in methods for m in band.methods):
        raise ConfigError(
            f"bench band.methods = {band.methods}: name one or more of the bench's methods "
            f"({', '.join(methods)})"
        )
    if not band.keys or len(set(leaves)) != len(leaves):
        raise ConfigError(
            f"bench band.keys = {band.keys}: give one or more dotted keys with distinct last "
            "parts, e.g. [gedi.w_gen, gedi.w_inv, gedi.w_prior]"
        )
    if (
        not band.factors
        or len(set(band.factors)) != len(band.factors)
        or any(f <= 0 or f == 1 for f in band.factors)
    ):
        raise ConfigError(
            f"bench band.factors = {band.factors}: give distinct positive factors other than "
            "1, e.g. [0.5, 2]"
        )
    out: dict[str, dict[str, Any]] = {}
    for method in band.methods:
        for key, leaf in zip(band.keys, leaves):
            value = _band_value(method, key, _apply(base, methods[method]))
            for f in band.factors:
                name = f"{leaf}_x{f:g}" if len(band.methods) == 1 else f"{method}@{leaf}_x{f:g}"
                scaled = value * f
                if isinstance(value, int) and float(scaled).is_integer():
                    scaled = int(scaled)  # an int setting stays an int (5 steps x 2 = 10)
                out[name] = {**methods[method], key: scaled}
    return out


def _band_value(method: str, key: str, raw: dict[str, Any]) -> int | float:
    """The value of ``key`` in a method's run config (its default when the method leaves it)."""
    try:
        node: Any = with_defaults(NesyRunConfig, raw)
    except ConfigError as exc:
        raise ConfigError(f"bench method {method}: {exc}") from None
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(
                f"bench band key {key!r} is not a run-config setting; give a dotted key of a "
                "number, e.g. gedi.w_inv"
            )
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float) or node == 0:
        raise ConfigError(
            f"bench band key {key} = {node!r} in method {method}: a band scales a non-zero "
            "number; band another key or set it in the method first"
        )
    return node


def trial_config(cfg: BenchConfig, trial: Trial) -> dict[str, Any]:
    """The ``gedi-nesy train`` config mapping of one trial (validated by the caller).

    Args:
        cfg: the bench config.
        trial: one of :func:`trials`.

    Returns:
        ``base`` with the method's overrides, the seed keys, the restart key and the size set,
        named after the trial, with its output folder under the bench's ``trials/``.
    """
    raw = _apply(cfg.base, bench_methods(cfg)[trial.method])
    for key in cfg.seed_keys:
        set_dotted(raw, key, trial.seed)
    if trial.restart > 0:
        set_dotted(raw, cfg.restart_key, trial.seed + RESTART_STRIDE * trial.restart)
    if trial.size is not None:
        assert cfg.size_key is not None
        set_dotted(raw, cfg.size_key, trial.size)
    raw["name"] = trial.name
    raw["out_dir"] = str(bench_dir(cfg) / "trials")
    return raw


def bench_dir(cfg: BenchConfig) -> Path:
    """The folder of the bench's outputs, ``<out_dir>/<name>``."""
    return Path(cfg.out_dir) / cfg.name


def trial_dir(cfg: BenchConfig, trial: Trial) -> Path:
    """The trial's run folder, ``<out_dir>/<name>/trials/<trial>``."""
    return bench_dir(cfg) / "trials" / trial.name


def read_metrics(cfg: BenchConfig, trial: Trial) -> dict[str, Any] | None:
    """The trial's ``metrics.json`` (the last thing a run writes); None when it is absent or
    damaged (not a JSON object), so the trial counts as unfinished and its rerun resumes the
    final checkpoint and writes it again.

    Raises:
        StorageError: the trial folder cannot be read (permissions).
    """
    path = trial_dir(cfg, trial) / "metrics.json"
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise StorageError(
            f"cannot read {path} ({exc.strerror}); make the bench folder readable"
        ) from None
    try:
        metrics = json.loads(text)
    except ValueError:
        return None
    return metrics if isinstance(metrics, dict) else None


def is_finished(cfg: BenchConfig, trial: Trial) -> bool:
    """Whether the trial wrote readable metrics (see :func:`read_metrics`)."""
    return read_metrics(cfg, trial) is not None


def _check_axes(cfg: BenchConfig) -> None:
    """Refuse a bench without methods or seeds, a size axis given halfway, repeated seeds or
    sizes, fewer than one restart, or restarts chosen by a metric that reads concept labels."""
    check_name("bench name", cfg.name)
    if not cfg.methods:
        raise ConfigError("the bench config has no methods; add e.g. methods: {dpl: {}}")
    if (
        not cfg.seeds
        or len(set(cfg.seeds)) != len(cfg.seeds)
        or not all(0 <= s < 2**32 - RESTART_STRIDE * cfg.restarts for s in cfg.seeds)
    ):
        raise ConfigError(
            f"bench seeds = {cfg.seeds}; give distinct seeds >= 0 (below 2**32 less the "
            "restart offsets), e.g. [0, 1, 2]"
        )
    if any(n < 1 for n in cfg.sizes):
        raise ConfigError(f"bench sizes = {cfg.sizes}; each size must be >= 1")
    if (cfg.size_key is None) != (not cfg.sizes) or len(set(cfg.sizes)) != len(cfg.sizes):
        raise ConfigError(
            f"bench size_key = {cfg.size_key!r} with sizes = {cfg.sizes}; give both (distinct "
            "sizes, e.g. size_key: task.n_train, sizes: [100, 300]) or neither"
        )
    if cfg.restarts < 1:
        raise ConfigError(f"bench restarts = {cfg.restarts}; give 1 (no restarts) or more")
    if reads_concept_labels(cfg.select_by):
        raise ConfigError(
            f"bench select_by = {cfg.select_by!r} reads concept labels; a restart is chosen by a "
            "label-free or task-label metric (docs/protocol.md), e.g. train_min_usage_c or "
            "best_val_task_acc"
        )


def trials(cfg: BenchConfig) -> list[Trial]:
    """Every trial in run order (method, then size, then seed, then restart), after checking
    the config.

    Args:
        cfg: the bench config.

    Returns:
        The trials.

    Raises:
        ConfigError: no methods or seeds, a method that is not a mapping, a size axis given
            halfway, duplicate seeds or sizes, a bad band, or a trial config ``gedi-nesy train``
            would refuse.
    """
    _check_axes(cfg)
    methods = bench_methods(cfg)
    sizes: list[int | None] = list(cfg.sizes) or [None]
    out = [
        Trial(m, n, s, r)
        for m in methods
        for n in sizes
        for s in cfg.seeds
        for r in range(cfg.restarts)
    ]
    for trial in out:
        try:
            from_dict(NesyRunConfig, trial_config(cfg, trial))
        except ConfigError as exc:
            raise ConfigError(f"bench trial {trial.name}: {exc}") from None
    return out


def check_finished_configs(cfg: BenchConfig, all_trials: Sequence[Trial]) -> None:
    """Refuse to skip a finished trial whose saved config differs from what the bench now asks.

    Args:
        cfg: the bench config.
        all_trials: its trials.

    Raises:
        ConfigError: naming the trial and the first setting that differs.
    """
    for trial in all_trials:
        saved_path = trial_dir(cfg, trial) / "config.yaml"
        if not is_finished(cfg, trial) or not saved_path.is_file():
            continue
        try:
            saved = with_defaults(NesyRunConfig, yaml.safe_load(saved_path.read_text()))
        except (yaml.YAMLError, ConfigError):
            raise ConfigError(
                f"bench trial {trial.name}: {saved_path} is damaged; delete "
                f"{trial_dir(cfg, trial)} to run the trial again"
            ) from None
        now = with_defaults(NesyRunConfig, trial_config(cfg, trial))
        found = config_difference(saved, now)
        if found is not None:
            key, a, b = found
            raise ConfigError(
                f"bench trial {trial.name} finished with {key} = {a!r}, the bench now says "
                f"{b!r}; give the bench another name, or delete {trial_dir(cfg, trial)} to run "
                "it again"
            )
