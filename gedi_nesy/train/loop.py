"""The one fit loop of every run, and the pieces it is made of.

:func:`fit` trains a *trainer* (anything keeping :class:`Trainer`: a step counter, an optimiser,
``train_step(*batch)`` and its resumable state) on the batches a :class:`Batches` draws, for the
steps ``optim.epochs`` and ``optim.max_steps`` give. It owns what every run shares: the data order
(a function of the step), the learning-rate schedule, validation with early stopping and
best-model keeping (when given a :class:`Validation`), hooks after each step (the joint run's
relabelling), the JSONL step log (:mod:`gedi_nesy.train.steplog`) and its curves, the progress
bar, atomic checkpoints and bit-identical resume.
Standalone GEDI (:mod:`gedi_nesy.train.standalone`) and joint training
(:mod:`gedi_nesy.train.run`) differ only in what they hand it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.nn as nn
from tqdm import tqdm

from gedi_nesy.config import OptimConfig
from gedi_nesy.errors import TrainingError
from gedi_nesy.schema import to_dict
from gedi_nesy.train.checkpoint import (
    CHECKPOINT_FORMAT,
    read_checkpoint,
    restore_failed,
    rng_state,
    set_rng_state,
)
from gedi_nesy.train.runtime import save_checkpoint
from gedi_nesy.train.steplog import StepLog

if TYPE_CHECKING:
    from gedi_nesy.config import GediRunConfig, NesyRunConfig


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the minibatch of global ``step``: epochs of seeded permutations of ``range(n)``.

    The order depends only on (n, batch_size, seed, step), so a resumed run sees exactly the
    batches an uninterrupted run would. The last batch of an epoch may be smaller.

    Args:
        n: data set size.
        batch_size: minibatch size.
        seed: data-order seed.
        step: global step (0-based).

    Returns:
        Indices, shape (<= batch_size,), int64.
    """
    per_epoch = math.ceil(n / batch_size)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)  # (n,)
    return perm[i * batch_size : (i + 1) * batch_size]


def total_steps(optim: OptimConfig, n: int) -> int:
    """Steps of a run: ``optim.epochs`` passes over ``n`` examples, capped by ``optim.max_steps``
    (either may be None, not both).

    Args:
        optim: the optimiser config.
        n: training examples (queries or images).
    """
    steps = [optim.max_steps] if optim.max_steps is not None else []
    if optim.epochs is not None:
        steps.append(optim.epochs * math.ceil(n / optim.batch_size))
    return min(steps)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor of a step: linear warm-up to 1, then constant or a cosine decay to
    0.1 at ``total_steps``.

    Args:
        step: the optimiser steps taken (0-based).
        schedule: ``constant`` or ``cosine``.
        warmup_steps: steps of the linear warm-up.
        total_steps: steps of the run.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule != "cosine":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def check_finite(parts: Mapping[str, float], step: int) -> None:
    """Stop with a message naming the step and the part when a loss part is not finite.

    Args:
        parts: logged loss parts.
        step: the step, for the message.
    """
    for name, value in parts.items():
        if not math.isfinite(value):
            raise TrainingError(
                f"step {step}: loss part {name} is {value}; lower optim.lr, raise "
                "gedi.energy_reg or lower the weight of that part"
            )


def backward_step(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    total: torch.Tensor,
    grad_clip: float,
) -> None:
    """One backward of ``total``, gradient-norm clipping (``grad_clip`` 0: none), one optimiser
    step. The caller zeroes the gradients before it computes ``total``.

    Args:
        optimizer: the trainer's optimiser.
        params: the parameters to clip.
        total: the scalar loss.
        grad_clip: max gradient norm.
    """
    total.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(list(params), grad_clip)
    optimizer.step()


class Trainer(Protocol):
    """What :func:`fit` trains.

    Attributes:
        step: optimiser steps taken; ``train_step`` adds one.
        optimizer: the optimiser the loop's learning-rate schedule drives.
    """

    step: int
    optimizer: torch.optim.Optimizer

    def train_step(self, *batch: Any) -> dict[str, float]:
        """One optimiser step on a batch; returns the values to log."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Batches(NamedTuple):
    """The training data as the loop sees it.

    Attributes:
        size: training examples; an epoch is ``ceil(size / optim.batch_size)`` steps.
        draw: ``(indices (B,), step) -> the arguments of train_step`` for that step.
        unit: what an example is, for the rate in the log (``<unit>_per_s``).
    """

    size: int
    draw: Callable[[torch.Tensor, int], tuple[Any, ...]]
    unit: str = "examples"


@dataclass
class Validation:
    """What validation means for a run.

    Attributes:
        score: the validation score now; higher is better (e.g. task accuracy on held-out
            queries).
        nets: the networks kept at their best score and restored when the loop ends.
        every: steps between validations; 0: once per epoch (and always after the last step).
        patience: validations without a better score before the loop stops; 0: never.
        name: the score's key in the log.
    """

    score: Callable[[], float]
    nets: Mapping[str, nn.Module]
    every: int = 0
    patience: int = 0
    name: str = "val_score"


class FitRecord:
    """What the loop tracks besides the trainer: the validation history and the best networks."""

    def __init__(self) -> None:
        self.best_val = -1.0
        self.bad_evals = 0
        self.best_nets: dict[str, Any] | None = None
        self.stopped_early = False

    def observe(self, score: float, nets: Mapping[str, nn.Module], patience: int) -> float:
        """Record a validation score: keep the networks when it is the best so far, else count
        a validation without improvement (and stop after ``patience`` of them; 0: never).

        Returns:
            ``score``.
        """
        if score > self.best_val:
            self.best_val, self.bad_evals = score, 0
            self.best_nets = {
                name: {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                for name, net in nets.items()
            }
        else:
            self.bad_evals += 1
            self.stopped_early = patience > 0 and self.bad_evals >= patience
        return score

    def forget_best(self) -> None:
        """Start the validation record afresh. After a relabelling that changed the names, a
        state kept from before would undo it: the search has just found, on every training
        query, that the old names prove fewer of them."""
        self.best_val, self.bad_evals, self.best_nets = -1.0, 0, None

    def restore_best(self, nets: Mapping[str, nn.Module]) -> None:
        """Load the kept best state into ``nets`` (nothing when none was kept)."""
        if self.best_nets is not None:
            for name, net in nets.items():
                net.load_state_dict(self.best_nets[name])


class StepHook(Protocol):
    """Runs after each training step (after the schedule's step, before validation)."""

    def __call__(self, step: int, total: int, record: FitRecord) -> dict[str, Any]:
        """Do the hook's work after ``step`` of ``total``; returns values to log (a non-empty
        result makes the step logged)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FitResult(NamedTuple):
    """How the loop ended: steps done (``first_step`` of them before this call, on resume),
    seconds of this call, the best validation score (-1: none) and whether it stopped early."""

    steps: int
    first_step: int
    seconds: float
    best_val: float
    stopped_early: bool


def fit(
    trainer: Trainer,
    batches: Batches,
    cfg: GediRunConfig | NesyRunConfig,
    run_dir: Path,
    *,
    validation: Validation | None = None,
    hooks: Sequence[StepHook] = (),
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train ``trainer`` for the run's steps; log, validate, checkpoint, and resume.

    Args:
        trainer: what trains (a :class:`Trainer`).
        batches: the training data.
        cfg: the run config: ``optim`` drives the loop, ``name`` labels the progress bar; the
            whole config goes into each checkpoint and must match it on resume.
        run_dir: where ``log.jsonl``, ``checkpoint.pt`` and, at the end, ``curves.png`` go.
        validation: validation with early stopping and best-model keeping; None: none.
        hooks: called after each step, in order.
        resume: continue from ``run_dir/checkpoint.pt``, bit-identical to a run never stopped.
        progress: show a progress bar.

    Returns:
        The :class:`FitResult`; with validation, the networks hold their best state.
    """
    o, ckpt = cfg.optim, Path(run_dir) / "checkpoint.pt"
    total = total_steps(o, batches.size)
    factor = partial(lr_factor, schedule=o.schedule, warmup_steps=o.warmup_steps, total_steps=total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, factor)
    record = FitRecord()
    if resume:
        _restore(ckpt, cfg, trainer, scheduler, record, hooks)
    log = StepLog(Path(run_dir) / "log.jsonl", resume_step=trainer.step if resume else None)
    bar = tqdm(total=total, initial=trainer.step, disable=not progress, desc=cfg.name)
    every = 0 if validation is None else validation.every or math.ceil(batches.size / o.batch_size)
    start, first = time.perf_counter(), trainer.step
    while trainer.step < total and not record.stopped_early:
        idx = batch_indices(batches.size, o.batch_size, o.seed, trainer.step)
        values: dict[str, Any] = trainer.train_step(*batches.draw(idx, trainer.step))
        scheduler.step()
        rate = (trainer.step - first) * o.batch_size / (time.perf_counter() - start)
        bar.update(1)
        step = trainer.step
        extra = _after_step(step, total, hooks, validation, every, record)
        values.update(extra)
        if extra or step % o.log_every == 0 or step == total:
            speed = {f"{batches.unit}_per_s": round(rate, 2)}
            log.write({"step": step, "lr": scheduler.get_last_lr()[0], **speed, **values})
            shown = {k: f"{v:.3g}" for k, v in values.items() if isinstance(v, int | float)}
            bar.set_postfix(shown | {f"{batches.unit}/s": f"{rate:.0f}"})
        if step % o.checkpoint_every == 0 or step == total or record.stopped_early:
            save_checkpoint(ckpt, _checkpoint(cfg, trainer, scheduler, record, hooks))
    bar.close()
    seconds = time.perf_counter() - start
    log.save_curves(Path(run_dir) / "curves.png")
    if validation is not None:
        record.restore_best(validation.nets)
    return FitResult(trainer.step, first, seconds, record.best_val, record.stopped_early)


def _after_step(
    step: int,
    total: int,
    hooks: Sequence[StepHook],
    validation: Validation | None,
    every: int,
    record: FitRecord,
) -> dict[str, Any]:
    """The hooks, then validation when due (every ``every`` steps and after the last); the
    values they give to log."""
    extra: dict[str, Any] = {}
    for hook in hooks:
        extra.update(hook(step, total, record))
    if validation is not None and (step % every == 0 or step == total):
        score = validation.score()
        extra[validation.name] = record.observe(score, validation.nets, validation.patience)
    return extra


def _checkpoint(
    cfg: Any, trainer: Trainer, scheduler: Any, record: FitRecord, hooks: Sequence[StepHook]
) -> dict[str, Any]:
    """Everything a bit-identical resume needs, with the config it was made under."""
    return {
        "format": CHECKPOINT_FORMAT,
        "trainer": trainer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "fit": vars(record),
        "hooks": [hook.state_dict() for hook in hooks],
        "rng": rng_state(),
        "config": to_dict(cfg),
    }


def _restore(
    ckpt: Path,
    cfg: Any,
    trainer: Trainer,
    scheduler: Any,
    record: FitRecord,
    hooks: Sequence[StepHook],
) -> None:
    """Load a checkpoint of :func:`_checkpoint` made under the same config.

    Raises:
        TrainingError: no checkpoint, an earlier format, a damaged one, or another config.
    """
    saved = read_checkpoint(ckpt, cfg, len(hooks))
    try:
        trainer.load_state_dict(saved["trainer"])
        scheduler.load_state_dict(saved["scheduler"])
        record.__dict__.update(saved["fit"])
        for hook, state in zip(hooks, saved["hooks"]):
            hook.load_state_dict(state)
        set_rng_state(saved["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise restore_failed(ckpt, exc) from None
