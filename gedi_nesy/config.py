"""Typed run configuration: one dataclass per component (read from YAML by
:func:`gedi_nesy.schema.load_config`).

An unknown key, a value of the wrong type or out of range (each section checks its own values in
``__post_init__``) is a one-line error naming the key. Overrides use dotted keys:
``--set optim.lr=0.001``. Both kinds of run share ``model`` (also :class:`GEDINet`'s defaults),
``optim``, ``data.root``, ``gedi``, ``sgld`` and ``augment``; :class:`JointConfig` holds the
sections :class:`~gedi_nesy.train.joint.JointTrainer` reads.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from gedi_nesy.errors import ConfigError

SEED = "in [0, 2**32 - 1]"  # the seeds NumPy accepts

_RULES = {">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, ">= 2": lambda v: v >= 2,
          "> 0": lambda v: v > 0, "in [0, 1]": lambda v: 0 <= v <= 1,
          SEED: lambda v: 0 <= v < 2**32}  # fmt: skip


def check_name(key: str, value: str) -> None:
    """A run, bench or method name is one folder name: it cannot leave ``out_dir``.

    Raises:
        ConfigError: an empty name, one with a path separator, or one starting with '.'.
    """
    if (
        not value
        or any(sep in value for sep in ("/", "\\", "\0"))
        or value.startswith(".")
        or not value.isprintable()
    ):
        raise ConfigError(
            f"{key} = {value!r}: a name is one folder name inside out_dir (printable, no '/' or "
            "'\\', not starting with '.'); give e.g. my_run, and choose the place with out_dir"
        )


def check_section(cfg: Any, section: str, **rules: str) -> None:
    """A section's checks, run by its ``__post_init__`` (also when built in Python): each
    ``Literal`` field holds one of its values; each number named in ``rules`` is finite and
    keeps its rule (a key of ``_RULES``, e.g. ``tau="> 0"``); None passes.

    Raises:
        ConfigError: naming the first setting that fails, its value, what is allowed.
    """
    for name, hint in typing.get_type_hints(type(cfg)).items():
        allowed = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        if allowed and getattr(cfg, name) not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(
                f"{section}.{name} = {getattr(cfg, name)!r} is not allowed; use one of {choices}"
            )
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and _RULES[rule](value)):
            raise ConfigError(
                f"{section}.{name} = {value!r}; it must be a finite number {rule}: fix it in the "
                f"YAML file or with --set {section}.{name}=..."
            )


@dataclass
class AugmentConfig:
    """Ranges of the random per-image transforms."""

    rotate_deg: float = 15.0  # uniform in [-rotate_deg, rotate_deg]
    scale: tuple[float, float] = (0.85, 1.15)  # uniform zoom range
    shear_deg: float = 10.0  # uniform in [-shear_deg, shear_deg]
    translate: float = 0.12  # fraction of the half-width, uniform in [-t, t] per axis
    noise_std: float = 0.05  # additive Gaussian pixel noise (data range [-1, 1])

    def __post_init__(self) -> None:
        check_section(self, "augment", rotate_deg=">= 0", shear_deg=">= 0", translate=">= 0",
                      noise_std=">= 0")  # fmt: skip
        low, high = self.scale
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ConfigError(
                f"augment.scale = {list(self.scale)}: give [low, high] with 0 < low <= high, "
                "e.g. [0.85, 1.15] (1 is no zoom)"
            )


@dataclass
class ModelConfig:
    """The GEDI network; also the defaults of :class:`gedi_nesy.gedi.nets.GEDINet`."""

    k: int = 10  # values = domain size of the neural predicate (a joint run takes it from the task)
    width: int = 16  # encoder channels of the first layer
    feature_dim: int = 128
    proj_dim: int = 64
    tau: float = 0.1  # temperature dividing the head's scores
    head: Literal["cosine", "linear"] = "cosine"
    norm: Literal["none", "group"] = "group"  # GroupNorm: what made GEDI cluster (docs/gedi.md)
    # prototypes per value; > 1 overclusters: the GEDI terms see k * clusters_per_value clusters
    # and a value's probability is the sum of its clusters' (gedi_nesy.gedi.nets)
    clusters_per_value: int = 1

    def __post_init__(self) -> None:
        check_section(self, "model", k=">= 2", width=">= 1", feature_dim=">= 1", proj_dim=">= 1",
               tau="> 0", clusters_per_value=">= 1")  # fmt: skip


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

    def __post_init__(self) -> None:
        check_section(self, "sgld", buffer_size=">= 1", reinit_freq="in [0, 1]", n_steps=">= 1",
               step_size=">= 0", noise_std=">= 0", data_noise=">= 0",
               max_abs_energy="> 0")  # fmt: skip


@dataclass
class GediConfig:
    """Which objective, and the weights of its parts."""

    method: Literal["gedi", "swav", "jem"] = "gedi"
    # The defaults are joint training's full objective (recipes/addition_gedi.yaml, docs/gedi.md):
    # the spec's 1 / 1 / 1 saturates the bounded energy gap and drowns the logic loss.
    w_gen: float = 0.1
    w_inv: float = 0.1
    w_prior: float = 0.1
    energy_reg: float = 0.01  # alpha of the energy-magnitude penalty (only with w_gen > 0)
    symmetric_inv: bool = False
    clean_view: bool = False  # first view = the clean image: L_INV, L_PRIOR see what the logic sees
    prior_target: list[float] | None = None  # per cluster: what L_PRIOR matches; None: uniform
    tau_in_energy: bool = True  # False: the energy uses z * tau (scores before the temperature)
    swav_temperature: float = 0.1
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3
    w_marginal_entropy: float = 0.0  # joint training only: the L_H baseline on the clean batch

    def __post_init__(self) -> None:
        check_section(self, "gedi", w_gen=">= 0", w_inv=">= 0", w_prior=">= 0", energy_reg=">= 0",
               w_marginal_entropy=">= 0", swav_temperature="> 0", sinkhorn_epsilon="> 0",
               sinkhorn_iters=">= 1")  # fmt: skip
        values = self.prior_target  # its length is checked where K is known (gedi.objective)
        if values is not None and (not values or min(values) <= 0 or abs(sum(values) - 1) > 1e-3):
            raise ConfigError(
                f"gedi.prior_target = {values}: it must hold one value > 0 per cluster, summing "
                f"to 1 (they sum to {sum(values):.4g}); give the target marginal of the "
                "clusters, or null for uniform"
            )

    def part_weights(self) -> dict[str, float]:
        """The weights of the GEDI loss parts (``gen``, ``energy_reg``, ``inv``, ``prior``,
        ``swav``): ``gedi`` uses w_gen, w_inv, w_prior (w_gen = 0 is "GEDI without L_GEN");
        ``jem`` keeps only the generative term; ``swav`` only the swapped-prediction loss
        (weight w_inv). The energy penalty belongs to L_GEN: off when w_gen is 0."""
        reg = self.energy_reg if self.w_gen != 0.0 else 0.0
        gen, inv, prior, swav = self.w_gen, self.w_inv, self.w_prior, 0.0
        if self.method == "jem":
            inv = prior = 0.0
        elif self.method == "swav":
            gen, reg, inv, prior, swav = 0.0, 0.0, 0.0, 0.0, self.w_inv
        return {"gen": gen, "energy_reg": reg, "inv": inv, "prior": prior, "swav": swav}

    def trains_terms(self) -> bool:
        """Whether any GEDI loss part has a weight other than 0."""
        return any(w != 0.0 for w in self.part_weights().values())


@dataclass
class OptimConfig:
    """Optimiser, loop and stopping rule of every run (``gedi-nesy train`` and ``gedi-nesy
    gedi``). The settings marked "joint training only" must keep their defaults in a
    ``gedi-nesy gedi`` config."""

    epochs: int | None = 1  # passes over the training data; None: max_steps alone sets the length
    max_steps: int | None = None  # stop after this many steps (None: when the epochs end)
    batch_size: int = 32  # queries (joint training) or images (standalone GEDI) per step
    lr: float = 1.0e-3
    # joint only: SGD rate of the program's t(...) probabilities (DeepProbLog's SGD param_lr;
    # its noisy-addition example uses 1e-3); constant, 0 freezes them
    param_lr: float = 1.0e-3
    weight_decay: float = 0.0
    grad_clip: float = 10.0  # max gradient norm; 0 disables clipping
    schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up; cosine ends at 0.1
    warmup_steps: int = 0  # linear learning-rate warm-up
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 1  # torch CPU threads while training and evaluating (DeepProbLog: 1 is fastest)
    log_every: int = 10
    checkpoint_every: int = 200
    eval_every: int = 0  # joint training only: steps between validations; 0: once per epoch
    patience: int = 0  # joint only: validations without improvement before stopping; 0: never
    extra_images: int = 0  # joint only: unlabelled images added to each step's GEDI terms
    gedi_only_steps: int = 0  # joint only: first steps train the GEDI terms alone (logic weight 0)
    # joint only: the logic loss trains on the images or on a fresh random view of each
    # (augment's ranges); evaluation always uses the images
    logic_view: Literal["clean", "augmented"] = "clean"
    # joint only: every this many steps after gedi_only_steps, rename the concept values (or,
    # overclustered, re-assign the clusters) as the program proves the most training queries
    # (gedi_nesy.shortcuts.relabel); 0: never
    relabel_every: int = 0
    # joint only, overclustered relabelling: only cluster maps that predict every value for at
    # least this share of 1/K of the training images count (unless none does)
    relabel_min_share: float = 0.5

    def __post_init__(self) -> None:
        counts = ("epochs", "max_steps", "batch_size", "threads", "log_every", "checkpoint_every")
        others = ("param_lr", "weight_decay", "grad_clip", "warmup_steps", "eval_every", "patience",
                  "extra_images", "gedi_only_steps", "relabel_every")  # fmt: skip
        rules = dict.fromkeys(counts, ">= 1") | dict.fromkeys(others, ">= 0")
        check_section(self, "optim", **rules, lr="> 0", seed=SEED, relabel_min_share="in [0, 1]")
        if self.epochs is None and self.max_steps is None:
            raise ConfigError(
                "optim.epochs and optim.max_steps are both null; set at least one, e.g. "
                "optim.max_steps=1000, to say how long the run trains"
            )


JOINT_ONLY = {
    "optim": ("param_lr", "eval_every", "patience", "extra_images", "gedi_only_steps",
              "logic_view", "relabel_every", "relabel_min_share"),
    "gedi": ("w_marginal_entropy",),
}  # fmt: skip


@dataclass
class DataConfig:
    """Where the raw MNIST files are."""

    root: str | None = None  # None: $GEDI_NESY_DATA, then the user cache


@dataclass
class GediDataConfig(DataConfig):
    """Where the raw MNIST files are and how much of them standalone GEDI uses."""

    n_train: int | None = None  # None: all 60,000 training images
    n_test: int | None = None  # None: all 10,000 test images
    n_ood: int | None = None  # None: all 10,000 Fashion-MNIST test images

    def __post_init__(self) -> None:
        check_section(self, "data", n_train=">= 1", n_test=">= 1", n_ood=">= 1")


@dataclass
class LogicConfig:
    """Which exact-inference engine evaluates the program."""

    # compiled: one circuit per query template; deepproblog: its own per-query solve;
    # column_chain: N-digit add/3 as a chain of compiled column/5 circuits (gedi_nesy.logic.chain)
    engine: Literal["compiled", "deepproblog", "column_chain"] = "compiled"
    cache_dir: str | None = None  # compiled circuits; None: ~/.cache/gedi_nesy/compiled
    eval_batch: int = 256  # queries per evaluation call
    # let the SDD library garbage-collect and reorder variables while compiling: multi-digit
    # circuits stay near-linear in N (without it a 4-digit query's SDD is ~14x larger); false for
    # programs whose compilation stalls in ProbLog's build_sdd with it
    sdd_auto_gc: bool = True

    def __post_init__(self) -> None:
        check_section(self, "logic", eval_batch=">= 1")


@dataclass
class SupervisionConfig:
    """The concept-supervision baseline: a few labelled training images per concept."""

    labels_per_class: int = 0  # k images of each concept, from the training queries' images
    weight: float = 1.0  # weight of their cross-entropy in the joint loss
    augment: bool = False  # a fresh random view of each labelled image per step (augment's ranges)

    def __post_init__(self) -> None:
        check_section(self, "supervision", labels_per_class=">= 0", weight=">= 0")


def _check_warm_up(gedi: GediConfig, optim: OptimConfig) -> None:
    """GEDI-only warm-up steps need a GEDI term to train."""
    if optim.gedi_only_steps > 0 and not gedi.trains_terms():
        raise ConfigError(
            f"optim.gedi_only_steps = {optim.gedi_only_steps}: it must be >= 0, and > 0 only "
            "with a GEDI weight > 0 (otherwise those steps train nothing); set it to 0"
        )


@dataclass
class JointConfig:
    """What :class:`~gedi_nesy.train.joint.JointTrainer` reads: the GEDI terms, the sampler,
    the augmentations, the optimiser, the concept supervision and ``logic.eval_batch``.
    ``NesyRunConfig.joint`` is the one of a run."""

    gedi: GediConfig = field(default_factory=GediConfig)
    sgld: SGLDConfig = field(default_factory=SGLDConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    logic: LogicConfig = field(default_factory=LogicConfig)

    def __post_init__(self) -> None:
        _check_warm_up(self.gedi, self.optim)


@dataclass
class NesyRunConfig:
    """Joint DeepProbLog + GEDI training (``gedi-nesy train``)."""

    name: str = "mnist_addition"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    task: dict[str, Any] = field(default_factory=lambda: {"name": "mnist_addition"})
    model: ModelConfig = field(default_factory=ModelConfig)
    gedi: GediConfig = field(default_factory=GediConfig)
    sgld: SGLDConfig = field(default_factory=SGLDConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logic: LogicConfig = field(default_factory=LogicConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)

    def __post_init__(self) -> None:
        check_name("name", self.name)
        _check_warm_up(self.gedi, self.optim)

    @property
    def joint(self) -> JointConfig:
        """The sections the joint trainer reads, checked together."""
        return JointConfig(
            self.gedi, self.sgld, self.augment, self.optim, self.supervision, self.logic
        )


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
    data: GediDataConfig = field(default_factory=GediDataConfig)

    def __post_init__(self) -> None:
        check_name("name", self.name)
        if self.model.clusters_per_value != 1:
            raise ConfigError(
                f"model.clusters_per_value = {self.model.clusters_per_value}: standalone GEDI "
                "has no values to group clusters into; set it to 1 and model.k to the number "
                "of clusters"
            )
        for section, names in JOINT_ONLY.items():
            ours, default = getattr(self, section), type(getattr(self, section))()
            changed = [n for n in names if getattr(ours, n) != getattr(default, n)]
            if changed:
                raise ConfigError(
                    f"{section}.{changed[0]} = {getattr(ours, changed[0])!r} applies to joint "
                    "training (gedi-nesy train) only; remove it from this gedi-nesy gedi config"
                )
