"""One joint-training run from a config: fit with validation and checkpoints, then evaluate.

``run_training`` is what ``gedi-nesy train CONFIG`` calls after the CLI has built the task.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gedi_nesy.config import NesyOptimConfig, NesyRunConfig, to_dict, with_defaults
from gedi_nesy.errors import ConfigError
from gedi_nesy.logic.engine import build_logic
from gedi_nesy.logic.program import tensor_keys
from gedi_nesy.plots import save_confusion_png
from gedi_nesy.shortcuts.metrics import cluster_usage, concept_report, confusion_matrix
from gedi_nesy.task import TaskData
from gedi_nesy.train.joint import JointTrainer
from gedi_nesy.train.loop import StepLog, batch_indices
from gedi_nesy.train.runtime import (
    atomic_write_json,
    check_resume_config,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    start_run,
)
from gedi_nesy.train.standalone import build_net


def total_steps(cfg: NesyRunConfig, n_train: int) -> int:
    """Steps of the run: ``epochs`` passes over the training queries, capped by ``max_steps``."""
    o = cfg.optim
    steps = o.epochs * math.ceil(n_train / o.batch_size)
    return steps if o.max_steps is None else min(o.max_steps, steps)


def supervised_images(
    task: TaskData, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``per_class`` labelled images of each concept, drawn (seeded) from the images the
    training queries use; None when ``per_class`` is 0.

    Raises:
        ConfigError: the task has no training labels, or too few images of some concept.
    """
    if per_class == 0:
        return None
    if per_class < 0 or not task.train_labels:
        raise ConfigError(
            f"supervision.labels_per_class = {per_class}: it must be >= 0, and task "
            f"{task.name} must give train_labels; set it to 0"
        )
    keys = [k for k in tensor_keys(task.train) if k.args[0].functor in task.train_labels]
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed))
    picked: dict[int, list] = {}
    for i in order.tolist():
        source, index = keys[i].args[0].functor, int(keys[i].args[0].args[0])
        label = int(task.train_labels[source][index])
        if len(picked.setdefault(label, [])) < per_class:
            picked[label].append(task.sources[source][index])
    k = next(iter(task.networks.values()))
    short = [c for c in range(k) if len(picked.get(c, [])) < per_class]
    if short:
        raise ConfigError(
            f"supervision.labels_per_class = {per_class}, but the training images hold fewer "
            f"of concept {short[0]}; lower labels_per_class"
        )
    images = torch.stack([x for c in range(k) for x in picked[c]])  # (K * per_class, C, H, W)
    labels = torch.arange(k).repeat_interleave(per_class)  # (K * per_class,)
    return images, labels


def build_trainer(cfg: NesyRunConfig, task: TaskData, device: torch.device) -> JointTrainer:
    """A :class:`GEDINet` per network of the task, the logic engine, and the joint trainer."""
    nets = {name: build_net(replace(cfg.model, k=k)) for name, k in task.networks.items()}
    logic = build_logic(cfg.logic, task.program, task.networks)
    return JointTrainer(
        logic, nets, task.sources, gedi=cfg.gedi, sgld=cfg.sgld, augment=cfg.augment,
        optim=cfg.optim, device=device, eval_batch=cfg.logic.eval_batch,
        logic_device="cpu" if cfg.logic.engine == "deepproblog" else device,
        total_steps=total_steps(cfg, len(task.train)),
        supervised=supervised_images(task, cfg.supervision.labels_per_class, cfg.optim.seed),
        supervision_weight=cfg.supervision.weight,
        supervision_augment=cfg.supervision.augment,
    )  # fmt: skip


class _FitState:
    """What the loop itself tracks, besides the trainer: validation history and the best nets."""

    def __init__(self) -> None:
        self.best_val = -1.0
        self.bad_evals = 0
        self.best_nets: dict[str, Any] | None = None
        self.stopped_early = False
        self.relabels = 0  # relabellings that changed the names (optim.relabel_every)

    def forget_best(self) -> None:
        """Start the validation record afresh. After a relabelling that changed the names, a
        state kept from before would undo it: the search has just found, on every training
        query, that the old names prove fewer of them."""
        self.best_val, self.bad_evals, self.best_nets = -1.0, 0, None


def _relabel_due(o: NesyOptimConfig, step: int, total: int) -> bool:
    """Whether the loop relabels after this step: every ``relabel_every`` steps once the logic
    loss is on, never after the last step (the run would end on an untrained labelling)."""
    return (
        o.relabel_every > 0 and step > o.gedi_only_steps and step < total
        and (step - o.gedi_only_steps) % o.relabel_every == 0
    )  # fmt: skip


def _relabel(trainer: JointTrainer, task: TaskData, state: _FitState) -> dict[str, Any]:
    """Relabel on the training queries; count a change of names and forget the validation
    record kept under the old names. Returns the values to log."""
    found = trainer.relabel(task.train)
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
        state.relabels += 1
        state.forget_best()
    return values


def _extra_images(trainer: JointTrainer, task: TaskData, n: int, step: int) -> torch.Tensor | None:
    """``n`` unlabelled images drawn (seeded by step) from the task's unlabelled pool."""
    if n == 0:
        return None
    pools = [(src, idx) for src, idx in task.unlabelled.items() if len(idx) > 0]
    if not pools:
        raise ConfigError(
            f"optim.extra_images = {n}, but task {task.name} has no unlabelled images; "
            "set optim.extra_images: 0 or give the task unlabelled images (task.n_unlabelled)"
        )
    src, idx = pools[0]
    gen = torch.Generator().manual_seed(trainer.optim_cfg.seed * 7919 + step)
    pick = idx[torch.randint(len(idx), (n,), generator=gen)]  # (n,)
    return task.sources[src][pick]


def fit(
    trainer: JointTrainer, task: TaskData, cfg: NesyRunConfig, run_dir: Path, *,
    resume: bool, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """The training loop: steps, logs, validation with early stopping, atomic checkpoints."""
    o = cfg.optim
    n = len(task.train)
    per_epoch = math.ceil(n / o.batch_size)
    total = total_steps(cfg, n)
    eval_every = o.eval_every or per_epoch
    state, ckpt = _FitState(), run_dir / "checkpoint.pt"
    if resume:
        saved = load_checkpoint(ckpt)
        check_resume_config(with_defaults(type(cfg), saved["config"]), to_dict(cfg), ckpt)
        trainer.load_state_dict(saved["trainer"])
        state.__dict__.update(saved["fit"])
        set_rng_state(saved["rng"])
    log = StepLog(run_dir / "log.jsonl", resume_step=trainer.step if resume else None)
    bar = tqdm(total=total, initial=trainer.step, disable=not progress, desc=cfg.name)
    start, first = time.perf_counter(), trainer.step
    while trainer.step < total and not state.stopped_early:
        idx = batch_indices(n, o.batch_size, o.seed, trainer.step)
        extra = _extra_images(trainer, task, o.extra_images, trainer.step)
        values = trainer.train_step([task.train[i] for i in idx.tolist()], extra)
        rate = (trainer.step - first) * o.batch_size / (time.perf_counter() - start)
        bar.update(1)
        if _relabel_due(o, trainer.step, total):
            values.update(_relabel(trainer, task, state))
        if trainer.step % eval_every == 0 or trainer.step == total:
            values["val_task_acc"] = _validate(trainer, task, state, o.patience)
        if (
            trainer.step % o.log_every == 0
            or trainer.step == total
            or "val_task_acc" in values
            or "relabel_proved_after" in values
        ):
            lr = trainer.scheduler.get_last_lr()[0]
            log.write({"step": trainer.step, "lr": lr, "queries_per_s": round(rate, 2), **values})
            shown = {k: f"{v:.3g}" for k, v in values.items() if isinstance(v, int | float)}
            bar.set_postfix(shown | {"q/s": f"{rate:.0f}"})
        if trainer.step % o.checkpoint_every == 0 or trainer.step == total or state.stopped_early:
            save_checkpoint(ckpt, {"trainer": trainer.state_dict(), "fit": vars(state),
                                   "rng": rng_state(), "config": to_dict(cfg)})  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - start
    if state.best_nets is not None:
        for name, net in trainer.nets.items():
            net.load_state_dict(state.best_nets[name])
    return {
        "steps": trainer.step,
        "train_seconds": round(seconds, 2),
        "queries_per_s": round((trainer.step - first) * o.batch_size / max(seconds, 1e-9), 2),
        "best_val_task_acc": state.best_val,
        "stopped_early": state.stopped_early,
        "relabels": state.relabels,
    }


def _validate(trainer: JointTrainer, task: TaskData, state: _FitState, patience: int) -> float:
    acc = trainer.task_accuracy(task.val) if task.val else float("nan")
    if acc > state.best_val:
        state.best_val, state.bad_evals = acc, 0
        state.best_nets = {
            name: {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            for name, net in trainer.nets.items()
        }
    else:
        state.bad_evals += 1
        state.stopped_early = patience > 0 and state.bad_evals >= patience
    return acc


def training_usage(trainer: JointTrainer, task: TaskData) -> dict[str, Any]:
    """Label-free: how often each network predicts each value on the training queries' images.

    A concept value that is (almost) never predicted is the mark of a non-injective concept map,
    which is a reasoning shortcut unless the data lack that concept; no label is read.

    Returns:
        ``train_usage_c`` (K fractions) and ``train_min_usage_c`` (K times the smallest), per
        network (prefixed ``NAME.`` when the task has several).
    """
    keys = tensor_keys(task.train)
    images = trainer.images(keys)  # (n, C, H, W): each training image once
    metrics: dict[str, Any] = {}
    for name, k in task.networks.items():
        usage = cluster_usage(trainer.concept_probs(name, images).argmax(-1).numpy(), k)  # (K,)
        key = "" if len(task.networks) == 1 else f"{name}."
        metrics[f"{key}train_usage_c"] = usage.round(6).tolist()
        metrics[f"{key}train_min_usage_c"] = round(float(k * usage.min()), 6)
    return metrics


def evaluate(trainer: JointTrainer, task: TaskData, run_dir: Path) -> dict[str, Any]:
    """Test task accuracy and concept metrics of every network, in and out of distribution,
    and the label-free usage of each concept value on the training images."""
    metrics: dict[str, Any] = {"test_task_acc": trainer.task_accuracy(task.test)}
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

    Args:
        cfg: the run configuration.
        task: the task built from ``cfg.task``.
        resume: continue from the run folder's checkpoint.
        progress: show a progress bar.

    Returns:
        The metrics written to ``metrics.json``.
    """
    o = cfg.optim
    run_dir, device = start_run(
        cfg.out_dir,
        cfg.name,
        to_dict(cfg),
        threads=o.threads,
        device=o.device,
        seed=o.seed,
    )
    trainer = build_trainer(cfg, task, device)
    metrics: dict[str, Any] = {"task": task.name, "device": str(device), **task.info}
    metrics.update(fit(trainer, task, cfg, run_dir, resume=resume, progress=progress))
    metrics.update(evaluate(trainer, task, run_dir))
    metrics["unprovable_train_queries"] = trainer.n_unprovable
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics
