"""One joint-training run from a config: build the trainer, fit it, evaluate, write the folder.

``run_training`` is what ``gedi-nesy train CONFIG`` calls after the CLI has built the task. The
loop is :func:`gedi_nesy.train.loop.fit`; what is joint-specific comes in here: the batches
(queries plus unlabelled images for the GEDI terms), validation on the task's validation queries
and the relabelling hook (``optim.relabel_every``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from gedi_nesy.config import NesyRunConfig, OptimConfig
from gedi_nesy.errors import ConfigError
from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.logic.engine import build_logic
from gedi_nesy.logic.program import tensor_keys
from gedi_nesy.plots import save_confusion_png
from gedi_nesy.schema import to_dict
from gedi_nesy.shortcuts.metrics import cluster_usage, concept_report, confusion_matrix
from gedi_nesy.task import TaskData
from gedi_nesy.train.checkpoint import read_checkpoint
from gedi_nesy.train.joint import JointTrainer
from gedi_nesy.train.loop import Batches, FitRecord, Validation, fit
from gedi_nesy.train.runtime import atomic_write_json, make_run_dir, prepare_run, torch_threads

if TYPE_CHECKING:
    from deepproblog.query import Query


def supervised_images(
    task: TaskData, per_class: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """``per_class`` labelled images of each concept, drawn (seeded) from the images the
    training queries use, for the task's one network; None when ``per_class`` is 0.

    Args:
        task: the task (exactly one network, with ``train_labels``).
        per_class: images per concept (``supervision.labels_per_class``).
        seed: seeds the draw.

    Returns:
        ``{network: (images (K * per_class, C, H, W), concepts (K * per_class,))}`` or None.

    Raises:
        ConfigError: the task has several networks or no training labels, or too few images of
            some concept.
    """
    if per_class == 0:
        return None
    if len(task.networks) != 1 or not task.train_labels:
        raise ConfigError(
            f"supervision.labels_per_class = {per_class}: concept supervision needs a task with "
            f"exactly one network and train_labels (task {task.name} has networks "
            f"{sorted(task.networks)}, train_labels for {sorted(task.train_labels)}); set it to 0"
        )
    keys = [k for k in tensor_keys(task.train) if k.args[0].functor in task.train_labels]
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed))
    picked: dict[int, list] = {}
    for i in order.tolist():
        source, index = keys[i].args[0].functor, int(keys[i].args[0].args[0])
        label = int(task.train_labels[source][index])
        if len(picked.setdefault(label, [])) < per_class:
            picked[label].append(task.sources[source][index])
    name, k = next(iter(task.networks.items()))
    short = [c for c in range(k) if len(picked.get(c, [])) < per_class]
    if short:
        raise ConfigError(
            f"supervision.labels_per_class = {per_class}, but the training images hold fewer "
            f"of concept {short[0]}; lower labels_per_class"
        )
    images = torch.stack([x for c in range(k) for x in picked[c]])  # (K * per_class, C, H, W)
    labels = torch.arange(k).repeat_interleave(per_class)  # (K * per_class,)
    return {name: (images, labels)}


def build_trainer(cfg: NesyRunConfig, task: TaskData, device: torch.device) -> JointTrainer:
    """A :class:`GEDINet` per network of the task (``model`` with the task's K), the logic
    engine, and the joint trainer.

    Args:
        cfg: the run config.
        task: the task.
        device: where the networks run.
    """
    nets = {name: GEDINet.from_config(replace(cfg.model, k=k)) for name, k in task.networks.items()}
    logic = build_logic(cfg.logic, task.program, task.networks)
    labelled = supervised_images(task, cfg.supervision.labels_per_class, cfg.optim.seed)
    return JointTrainer(
        logic, nets, task.sources, cfg.joint, device=device,
        logic_device="cpu" if cfg.logic.engine == "deepproblog" else None, labelled=labelled,
    )  # fmt: skip


def unlabelled_pools(trainer: JointTrainer, task: TaskData) -> dict[str, tuple[str, torch.Tensor]]:
    """Where each network's unlabelled images (``optim.extra_images``) come from: network name
    -> (source, image indices) of the first pool of ``task.unlabelled`` (in its order) whose
    source the network reads in the training queries. A network that reads no source with a
    pool gets none, so no network's GEDI terms see another network's kind of image.

    Raises:
        ConfigError: no network reads a source with unlabelled images.
    """
    pools: dict[str, tuple[str, torch.Tensor]] = {}
    for name, keys in trainer.route(task.train).items():
        reads = {key.args[0].functor for key in keys}
        found = [(src, idx) for src, idx in task.unlabelled.items() if src in reads and len(idx)]
        if found:
            pools[name] = found[0]
    if not pools:
        raise ConfigError(
            f"optim.extra_images = {trainer.optim_cfg.extra_images}, but task {task.name} has no "
            "unlabelled images its networks read; set optim.extra_images: 0 or give the task "
            "unlabelled images (task.n_unlabelled)"
        )
    return pools


def joint_batches(trainer: JointTrainer, task: TaskData) -> Batches:
    """The loop's batches: a step's training queries, and ``optim.extra_images`` unlabelled
    images per network for its GEDI terms (drawn seeded by the step from its pool, see
    :func:`unlabelled_pools`)."""
    o = trainer.optim_cfg
    pools = unlabelled_pools(trainer, task) if o.extra_images > 0 else {}

    def draw(idx: torch.Tensor, step: int) -> tuple[list[Query], dict[str, torch.Tensor] | None]:
        queries = [task.train[i] for i in idx.tolist()]
        extra = {}
        for name, (source, pool) in pools.items():
            gen = torch.Generator().manual_seed(o.seed * 7919 + step)
            pick = pool[torch.randint(len(pool), (o.extra_images,), generator=gen)]  # (m,)
            extra[name] = task.sources[source][pick]  # (m, C, H, W)
        return queries, extra or None

    return Batches(len(task.train), draw, unit="queries")


def relabel_due(o: OptimConfig, step: int, total: int) -> bool:
    """Whether the loop relabels after this step: every ``relabel_every`` steps once the logic
    loss is on, never after the last step (the run would end on an untrained labelling)."""
    return (
        o.relabel_every > 0 and step > o.gedi_only_steps and step < total
        and (step - o.gedi_only_steps) % o.relabel_every == 0
    )  # fmt: skip


class Relabeller:
    """The joint run's step hook for ``optim.relabel_every``: relabel on the training queries
    when :func:`relabel_due`, count the relabellings that change the names, and restart the
    validation record kept under the old names (:meth:`FitRecord.forget_best`).

    Args:
        trainer: the trainer (exactly one network with an output layer ``head``).
        queries: the training queries.
        optim: the optimiser config.

    Raises:
        ConfigError: the trainer's networks cannot be relabelled.
    """

    def __init__(self, trainer: JointTrainer, queries: list[Query], optim: OptimConfig) -> None:
        if trainer._relabel_head() is None:  # the trainer's own test of what it can relabel
            raise ConfigError(
                f"optim.relabel_every = {optim.relabel_every}: it must be >= 0, and > 0 only with "
                f"exactly one network that has an output layer `head` (a GEDINet; the program "
                f"has {sorted(trainer.nets)}); set it to 0"
            )
        self.trainer, self.queries, self.optim = trainer, queries, optim
        self.relabels = 0  # relabellings that changed the names

    def __call__(self, step: int, total: int, record: FitRecord) -> dict[str, Any]:
        """Relabel when due; returns the values to log (none when not due)."""
        if not relabel_due(self.optim, step, total):
            return {}
        found = self.trainer.relabel(self.queries)
        values: dict[str, Any] = {
            "relabel_proved_before": found.current_value / found.total,
            "relabel_proved_after": found.value / found.total,
            "relabel_search_complete": int(found.complete),
        }
        if found.min_usage is not None:
            values["relabel_min_usage_before"] = found.current_min_usage
            values["relabel_min_usage_after"] = found.min_usage
        if found.changed:
            values["relabel_map"] = list(found.mapping)
            self.relabels += 1
            record.forget_best()
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"relabels": self.relabels}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.relabels = state["relabels"]


class JointParts(NamedTuple):
    """What the loop needs besides the trainer, built (and so checked) before the run folder."""

    batches: Batches
    validation: Validation | None
    hooks: list[Relabeller]


def joint_parts(trainer: JointTrainer, task: TaskData, cfg: NesyRunConfig) -> JointParts:
    """The batches, validation on ``task.val`` (early stopping, best networks kept; none when
    the task has no validation queries: the last networks are evaluated) and the relabelling
    hook when configured.

    Raises:
        ConfigError: extra images without a pool, relabelling networks that cannot be, or
            early stopping without validation queries.
    """
    o = cfg.optim
    if o.patience > 0 and not task.val:
        raise ConfigError(
            f"optim.patience = {o.patience} stops on validation sums, but task {task.name} has "
            "none; give it some (task.n_val, or task.n_val_per_world for the shortcut tasks), or "
            "set optim.patience: 0 to train to the end"
        )
    validation = Validation(
        score=lambda: trainer.task_accuracy(task.val), nets=trainer.validated_modules(),
        every=o.eval_every, patience=o.patience, name="val_task_acc",
    ) if task.val else None  # fmt: skip
    hooks = [Relabeller(trainer, task.train, o)] if o.relabel_every > 0 else []
    return JointParts(joint_batches(trainer, task), validation, hooks)


def fit_joint(
    trainer: JointTrainer, parts: JointParts, cfg: NesyRunConfig, run_dir: Path, *,
    resume: bool = False, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Train on the task's queries with :func:`~gedi_nesy.train.loop.fit` and the parts of
    :func:`joint_parts`.

    Returns:
        ``steps``, ``train_seconds``, ``queries_per_s``, ``best_val_task_acc``,
        ``stopped_early``, ``relabels``.
    """
    o, hooks = cfg.optim, parts.hooks
    done = fit(trainer, parts.batches, cfg, run_dir, validation=parts.validation, hooks=hooks,
               resume=resume, progress=progress)  # fmt: skip
    return {
        "steps": done.steps,
        "train_seconds": round(done.seconds, 2),
        "queries_per_s": round((done.steps - done.first_step) * o.batch_size
                               / max(done.seconds, 1e-9), 2),
        "best_val_task_acc": done.best_val,
        "stopped_early": done.stopped_early,
        "relabels": hooks[0].relabels if hooks else 0,
    }  # fmt: skip


def training_usage(trainer: JointTrainer, task: TaskData) -> dict[str, Any]:
    """Label-free: how often each network predicts each value on its training images.

    A concept value that is (almost) never predicted is the mark of a non-injective concept map,
    which is a reasoning shortcut unless the data lack that concept; no label is read.

    Returns:
        ``train_usage_c`` (K fractions) and ``train_min_usage_c`` (K times the smallest), per
        network (prefixed ``NAME.`` when the task has several).
    """
    routes = trainer.route(task.train)  # each training image once, for the network it feeds
    metrics: dict[str, Any] = {}
    for name, k in task.networks.items():
        if name not in routes:
            continue
        images = trainer.images(routes[name])  # (n, C, H, W)
        usage = cluster_usage(trainer.concept_probs(name, images).argmax(-1).numpy(), k)  # (K,)
        key = "" if len(task.networks) == 1 else f"{name}."
        metrics[f"{key}train_usage_c"] = usage.round(6).tolist()
        metrics[f"{key}train_min_usage_c"] = round(float(k * usage.min()), 6)
    return metrics


def evaluate(trainer: JointTrainer, task: TaskData, run_dir: Path) -> dict[str, Any]:
    """Test task accuracy (the most probable answer, and the answer of the argmax concepts),
    concept metrics of every network, in and out of distribution, and two label-free signals: the
    task accuracy on the training queries (``train_task_acc``, their task labels only) and the
    usage of each concept value on the training images."""
    metrics: dict[str, Any] = {
        "test_task_acc": trainer.task_accuracy(task.test),
        "test_task_acc_argmax": trainer.argmax_task_accuracy(task.test),
        "train_task_acc": trainer.task_accuracy(task.train),
    }
    metrics.update(_concepts(trainer, task, task.concept_images, task.concept_labels, run_dir, ""))
    if task.ood_test:
        metrics["ood_task_acc"] = trainer.task_accuracy(task.ood_test)
        assert task.ood_concept_images is not None and task.ood_concept_labels is not None
        metrics.update(
            _concepts(trainer, task, task.ood_concept_images, task.ood_concept_labels, run_dir,
                      "ood_")
        )  # fmt: skip
    metrics.update(training_usage(trainer, task))
    return metrics


def _concepts(
    trainer: JointTrainer, task: TaskData, source: str, labels: torch.Tensor, run_dir: Path,
    prefix: str,
) -> dict[str, Any]:  # fmt: skip
    """Concept report and confusion matrix (JSON + PNG) of every network on one image source."""
    metrics: dict[str, Any] = {}
    images, truth = task.sources[source], labels.numpy()
    for name, k in task.networks.items():
        probs = trainer.concept_probs(name, images)  # (N, K)
        pred = probs.argmax(-1).numpy()
        report = concept_report(truth, pred, probs.numpy(), k)
        key = prefix if len(task.networks) == 1 else f"{prefix}{name}."
        metrics.update({key + metric: value for metric, value in report.items()})
        matrix = confusion_matrix(truth, pred, k, k)
        atomic_write_json(run_dir / f"{prefix}confusion_{name}.json", matrix.tolist())
        save_confusion_png(matrix, run_dir / f"{prefix}confusion_{name}.png",
                           title=f"{task.name}: {name} on {source}")  # fmt: skip
    return metrics


def run_training(
    cfg: NesyRunConfig, task: TaskData, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train on the task's queries with the joint loss, evaluate, and write ``runs/<name>/``.

    Everything runs with ``optim.threads`` torch threads; the count before is restored.

    Args:
        cfg: the run configuration.
        task: the task built from ``cfg.task``.
        resume: continue from the run folder's checkpoint.
        progress: show a progress bar.

    Returns:
        The metrics written to ``metrics.json``.
    """
    o = cfg.optim
    run_dir, device = prepare_run(cfg.out_dir, cfg.name, device=o.device, seed=o.seed)
    with torch_threads(o.threads):
        trainer = build_trainer(cfg, task, device)
        parts = joint_parts(trainer, task, cfg)
        if resume:
            read_checkpoint(run_dir / "checkpoint.pt", cfg, len(parts.hooks))
        make_run_dir(run_dir, to_dict(cfg))
        metrics: dict[str, Any] = {"task": task.name, "device": str(device), **task.info}
        metrics.update(fit_joint(trainer, parts, cfg, run_dir, resume=resume, progress=progress))
        metrics.update(evaluate(trainer, task, run_dir))
    metrics["unprovable_train_queries"] = trainer.n_unprovable
    if trainer.parameters is not None:  # the program's t(...) probabilities, as evaluated
        metrics["learned_probabilities"] = trainer.parameters.values()
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics
