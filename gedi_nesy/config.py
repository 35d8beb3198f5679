"""Typed run configuration: one dataclass per component, loaded from YAML with overrides.

An unknown key is an error that names the key and lists the allowed ones; a value of the wrong
type is an error that names the key, the value and the expected type. Overrides use dotted keys:
``--set train.lr=0.001``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from gedi_nesy.errors import ConfigError


@dataclass
class AugmentConfig:
    """Ranges of the random per-image transforms."""

    rotate_deg: float = 15.0  # uniform in [-rotate_deg, rotate_deg]
    scale: tuple[float, float] = (0.85, 1.15)  # uniform zoom range
    shear_deg: float = 10.0  # uniform in [-shear_deg, shear_deg]
    translate: float = 0.12  # fraction of the half-width, uniform in [-t, t] per axis
    noise_std: float = 0.05  # additive Gaussian pixel noise (data range [-1, 1])


@dataclass
class ModelConfig:
    """The GEDI network (see :class:`gedi_nesy.gedi.nets.GEDINet`)."""

    k: int = 10  # values = domain size of the neural predicate (a joint run takes it from the task)
    width: int = 16  # encoder channels of the first layer
    feature_dim: int = 128
    proj_dim: int = 64
    tau: float = 0.1  # temperature dividing the head's scores
    head: Literal["cosine", "linear"] = "cosine"
    norm: Literal["none", "group"] = "none"
    # prototypes per value; > 1 overclusters: the GEDI terms see k * clusters_per_value clusters
    # and a value's probability is the sum of its clusters' (gedi_nesy.gedi.nets)
    clusters_per_value: int = 1


@dataclass
class SGLDConfig:
    """Persistent SGLD sampler for the generative term."""

    buffer_size: int = 10000
    reinit_freq: float = 0.05
    n_steps: int = 10
    step_size: float = 1.0
    noise_std: float = 0.01
    data_noise: float = 0.03  # N(0, data_noise^2) added to data inputs of L_GEN
    max_abs_energy: float = 1.0e4  # abort when |E| exceeds this


@dataclass
class GediConfig:
    """Which objective, and the weights of its parts."""

    method: Literal["gedi", "swav", "jem"] = "gedi"
    w_gen: float = 1.0
    w_inv: float = 1.0
    w_prior: float = 1.0
    energy_reg: float = 0.0  # alpha of the energy-magnitude penalty
    symmetric_inv: bool = False
    clean_view: bool = False  # first view = the clean image: L_INV, L_PRIOR see what the logic sees
    prior_target: list[float] | None = None  # per cluster: what L_PRIOR matches; None: uniform
    tau_in_energy: bool = True  # False: the energy uses z * tau (scores before the temperature)
    swav_temperature: float = 0.1
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3
    w_marginal_entropy: float = 0.0  # joint training only: the L_H baseline on the clean batch


@dataclass
class OptimConfig:
    """Optimiser and loop."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    grad_clip: float = 10.0  # max gradient norm; 0 disables clipping
    warmup_steps: int = 100  # linear learning-rate warm-up
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 2  # torch CPU threads
    log_every: int = 20
    checkpoint_every: int = 500


@dataclass
class DataConfig:
    """Where the raw MNIST files are and how much of them to use."""

    root: str | None = None  # None: $GEDI_NESY_DATA, then the user cache
    n_train: int | None = None  # None: all 60,000 training images
    n_test: int | None = None  # None: all 10,000 test images
    n_ood: int | None = None  # None: all 10,000 Fashion-MNIST test images


@dataclass
class GediRunConfig:
    """Standalone GEDI training (``gedi-nesy gedi``)."""

    name: str = "gedi_mnist"
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    sgld: SGLDConfig = field(default_factory=SGLDConfig)
    gedi: GediConfig = field(default_factory=GediConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class NesyOptimConfig:
    """Optimiser, loop and stopping rule of the joint trainer."""

    epochs: int = 1
    max_steps: int | None = None  # stop earlier than `epochs` (None: no limit)
    batch_size: int = 32  # queries per step
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    grad_clip: float = 10.0  # max gradient norm; 0 disables clipping
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 1  # DeepProbLog's many tiny ops run fastest on one thread
    log_every: int = 10
    checkpoint_every: int = 200
    eval_every: int = 0  # steps between validation runs; 0: once per epoch
    patience: int = 0  # validations without improvement before stopping; 0: never stop early
    extra_images: int = 0  # unlabelled images added to each step's GEDI terms
    gedi_only_steps: int = 0  # first steps train the GEDI terms alone (logic loss weight 0)
    # what the logic loss sees in training: the images, or a fresh random view of each (augment's
    # ranges); evaluation always uses the images
    logic_view: Literal["clean", "augmented"] = "clean"
    # every this many steps after gedi_only_steps, rename the concept values by the permutation
    # under which the program proves the most training queries (gedi_nesy.shortcuts.relabel);
    # 0: never.
    # With model.clusters_per_value > 1 it re-assigns each cluster a value instead
    relabel_every: int = 0
    # overclustered relabelling: only cluster maps under which every value is predicted for at
    # least this share of 1/K of the training images count (unless none is)
    relabel_min_share: float = 0.5


@dataclass
class LogicConfig:
    """Which exact-inference engine evaluates the program."""

    # compiled: one circuit per query template; deepproblog: its own per-query solve;
    # column_chain: N-digit add/3 as a chain of compiled column/5 circuits (gedi_nesy.logic.chain)
    engine: Literal["compiled", "deepproblog", "column_chain"] = "compiled"
    cache_dir: str | None = None  # compiled circuits; None: ~/.cache/gedi_nesy/compiled
    eval_batch: int = 256  # queries per evaluation call


@dataclass
class SupervisionConfig:
    """The concept-supervision baseline: a few labelled training images per concept."""

    labels_per_class: int = 0  # k images of each concept, from the training queries' images
    weight: float = 1.0  # weight of their cross-entropy in the joint loss
    augment: bool = False  # a fresh random view of each labelled image per step (augment's ranges)


@dataclass
class NesyRunConfig:
    """Joint DeepProbLog + GEDI training (``gedi-nesy train``)."""

    name: str = "mnist_addition"
    out_dir: str = "runs"
    data_root: str | None = None  # None: $GEDI_NESY_DATA, then the user cache
    task: dict[str, Any] = field(default_factory=lambda: {"name": "mnist_addition"})
    model: ModelConfig = field(default_factory=ModelConfig)
    gedi: GediConfig = field(default_factory=GediConfig)
    sgld: SGLDConfig = field(default_factory=SGLDConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: NesyOptimConfig = field(default_factory=NesyOptimConfig)
    logic: LogicConfig = field(default_factory=LogicConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)


C = TypeVar("C")


def load_config(path: str | Path | None, cls: type[C], overrides: list[str] | None = None) -> C:
    """Read a YAML file into the dataclass ``cls``, then apply ``key.sub=value`` overrides.

    A mapping anywhere in the file (the top level, a section, a bench method) may name another
    YAML file with ``extends: other.yaml``, relative to the file that says it: that file's
    mapping (with its own ``extends`` resolved, so chains work) is the starting point, and the
    mapping's other keys are deep-merged over it (mappings merge key by key, any other value
    replaces). Overrides apply after every ``extends``.

    Args:
        path: YAML file, or None for the defaults.
        cls: the top-level config dataclass, e.g. :class:`GediRunConfig`.
        overrides: strings ``a.b=value``; each value is parsed as YAML (``true``, ``[1, 2]``).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: the file (or one it extends) is missing or not a mapping, ``extends`` makes
            a cycle, a key is unknown, or a value has the wrong type.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(cls, raw, prefix="")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a YAML file with every ``extends`` in it resolved.

    Args:
        path: the file.
        chain: the files whose ``extends`` led here, outermost first (for errors and cycles).
    """
    via = f" (extended by {chain[-1]})" if chain else ""
    if not path.is_file():
        fix = "fix the extends path" if chain else "pass a YAML file, e.g. configs/*.yaml"
        raise ConfigError(f"config file {path}{via} does not exist; {fix}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"config file {path}{via}{where} is not valid YAML; fix the syntax"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path}{via} must hold a mapping of sections, got {type(raw).__name__}"
        )
    return _resolve_extends(raw, path, (*chain, path))


def _resolve_extends(node: Any, path: Path, chain: tuple[Path, ...]) -> Any:
    """``node`` with each mapping's ``extends: FILE`` replaced by FILE's mapping (relative to
    ``path``, the file being read) with the mapping's other keys deep-merged over it."""
    if not isinstance(node, dict):
        return node
    node = {key: _resolve_extends(value, path, chain) for key, value in node.items()}
    if "extends" not in node:
        return node
    target = node.pop("extends")
    if not isinstance(target, str) or not target:
        raise ConfigError(
            f"config file {path}: extends = {target!r}; give one YAML file, relative to "
            f"{path.parent}, e.g. extends: recipes/dpl.yaml"
        )
    parent = path.parent / target
    if any(parent.resolve() == seen.resolve() for seen in chain):
        cycle = " -> ".join(str(p) for p in (*chain, parent))
        raise ConfigError(f"config file {path}: extends makes a cycle ({cycle}); remove one")
    return _deep_merge(_read_yaml(parent, chain), node)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys merged in: two mappings merge key by key, else ``over``'s
    value replaces; new keys come after ``base``'s."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is not of the form key.sub=value, e.g. optim.lr=0.001"
        )
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def from_dict(cls: type[C], raw: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, got {raw!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _convert(value, hints[name], f"{prefix}{name}")
    return cls(**values)


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config key {key} = {value!r} is not allowed; use one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"config key {key} = {value!r} must be a list of {len(args)} values")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} = {value!r} must be a mapping of keys")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} = {value!r} must be a list")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    return _scalar(value, hint, key)


def _scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _is_float(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is Any:
        return value
    raise ConfigError(
        f"config key {key} = {value!r} ({type(value).__name__}) must be of type "
        f"{getattr(hint, '__name__', hint)}; fix the value in the YAML file or the --set override"
    )


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (tuples as lists), for YAML/JSON output."""
    return _plain(dataclasses.asdict(cfg))


def with_defaults(cls: type[C], raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config (plain dicts) read through the schema of ``cls`` and written out again:
    settings added since it was saved take their defaults, which keep the earlier behaviour, so
    it compares equal to a current config that leaves them unset.

    Raises:
        ConfigError: a key the schema no longer has, or a value of the wrong type.
    """
    return to_dict(from_dict(cls, raw))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x
