"""World-sampled pair tasks (rsbench's MNIST-EvenOdd and MNIST-Half): the sampling they share.

A *world* is an ordered pair of digits (d1, d2). Construction (shared/docs/shortcuts.md): every
world gets ``n_train_per_world`` (420) train, ``n_val_per_world`` (120) val and
``n_test_per_world`` (60) test samples; each image is drawn with replacement from the images of
its digit, train and val from MNIST-train, test from MNIST-test (so a val image may also occur in
train, as in that construction). Train, val and the in-distribution (ID) test keep the task's
training worlds; the out-of-distribution (OOD) test holds every other world. Train and val
samples of the OOD worlds would be discarded, so they are never drawn.

Draws use one ``torch.Generator`` seeded with ``seed``, in the order train, val, ID test, OOD
test; worlds in the order of ``WorldTask.train_worlds`` and :func:`ood_worlds`; ``n``
consecutive queries per world.

Queries are ``addition(p0_0, p1_0, S)`` with the substitution ``pI_0 -> tensor(source(index))``,
as in ``tasks/mnist_addition.py``. Image sources of the TaskData: ``train`` is MNIST-train (train
and val queries index it); ``idtest`` and ``oodtest`` hold the drawn test images stacked in query
order (query q uses images 2q and 2q + 1), so concept metrics run on exactly the images the test
queries use: ``concept_images = "idtest"``, ``concept_labels`` their digits; the OOD test and its
digits are ``ood_test`` and ``ood_concept_labels``. Test sets are plain: no label-balanced
resampling (rsbench evaluates through one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from deepproblog.query import Query
from problog.logic import Constant, Term

from gedi_nesy.config import SEED, check_section
from gedi_nesy.data import load_images
from gedi_nesy.errors import DataError
from gedi_nesy.schema import from_dict
from gedi_nesy.shortcuts.audit import AuditSpec
from gedi_nesy.task import TaskData

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
NETWORK = "digit_net"
ID_SOURCE, OOD_SOURCE = "idtest", "oodtest"

World = tuple[int, int]


@dataclass
class WorldParams:
    """The ``task:`` section of a config for a world-sampled task (``mnist_evenodd``,
    ``mnist_half``)."""

    name: str | None = None  # the task's registry name (the CLI reads it)
    n_train_per_world: int = 420  # train samples of each training world
    n_val_per_world: int = 120  # val samples of each training world
    n_test_per_world: int = 60  # test samples of every world (ID and OOD)
    seed: int = 0  # seeds every image draw


class WorldTask(NamedTuple):
    """A world-sampled pair task: its worlds, digits and program."""

    name: str
    program: Path
    digits: tuple[int, ...]  # the digit d is column d of the network's output
    train_worlds: list[World]


def all_worlds(digits: Sequence[int]) -> list[World]:
    """Every ordered pair of ``digits``, first digit major: (0, 0), (0, 1), ..., (9, 9).

    Args:
        digits: the digit values.

    Returns:
        ``len(digits) ** 2`` worlds.
    """
    return [(a, b) for a in digits for b in digits]


def ood_worlds(task: WorldTask) -> list[World]:
    """The worlds outside the training worlds, in :func:`all_worlds` order.

    Args:
        task: the task.

    Returns:
        84 worlds for MNIST-EvenOdd, 18 for MNIST-Half.
    """
    train = set(task.train_worlds)
    return [w for w in all_worlds(task.digits) if w not in train]


def world_digits(worlds: Sequence[World], n_per_world: int) -> torch.Tensor:
    """The digits of ``n_per_world`` consecutive samples of each world.

    Args:
        worlds: the worlds, in order.
        n_per_world: samples per world.

    Returns:
        Shape (len(worlds) * n_per_world, 2), int64; rows ``w * n .. (w + 1) * n - 1`` are world w.
    """
    table = torch.tensor(worlds, dtype=torch.int64).view(-1, 2)  # (W, 2)
    return table.repeat_interleave(n_per_world, dim=0)  # (W * n, 2)


def draw_images(
    digits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """For each wanted digit, an image index drawn uniformly with replacement among its images.

    Args:
        digits: wanted digits, any shape, int64.
        labels: the digit of every image of the data set, (N,).
        generator: the random stream (draws go digit by digit, ascending, row-major within).

    Returns:
        Image indices, same shape as ``digits``, with ``labels[index] == digit``.

    Raises:
        DataError: the data set holds no image of a wanted digit.
    """
    picks = torch.empty_like(digits)  # same shape as digits
    for d in digits.unique().tolist():
        pool = (labels == d).nonzero().squeeze(1)  # (n_d,) indices of digit d
        if len(pool) == 0:
            raise DataError(
                f"the MNIST split holds {len(labels)} images but none of digit {d}; the task "
                f"draws images of every digit of its worlds, use the complete MNIST files"
            )
        wanted = digits == d  # same shape as digits, bool
        draws = torch.randint(len(pool), (int(wanted.sum()),), generator=generator)  # (m,)
        picks[wanted] = pool[draws]
    return picks


def sum_query(source: str, indices: Sequence[int], label: int) -> Query:
    """``addition(p0_0, p1_0, label)`` with ``pI_0 -> tensor(source(indices[I]))``.

    The placeholder form of ``tasks/mnist_addition.py``: queries with one label share a circuit.

    Args:
        source: tensor-source name.
        indices: the two image indices into the source.
        label: the sum.

    Returns:
        The query with its substitution.
    """
    names = [Term(f"p{i}_0") for i in range(len(indices))]
    subs = {
        name: Term("tensor", Term(source, Constant(int(index))))
        for name, index in zip(names, indices, strict=True)
    }
    return Query(Term("addition", *names, Constant(int(label))), subs)


def pair_queries(source: str, pairs: torch.Tensor, digits: torch.Tensor) -> list[Query]:
    """One :func:`sum_query` per row: images ``pairs[q]`` whose digits are ``digits[q]``.

    Args:
        source: tensor-source name.
        pairs: image indices, (Q, 2).
        digits: their digits, (Q, 2).

    Returns:
        Q queries labelled with the sums ``digits[q, 0] + digits[q, 1]``.
    """
    sums = digits.sum(1)  # (Q,)
    return [sum_query(source, p, s) for p, s in zip(pairs.tolist(), sums.tolist(), strict=True)]


def stacked_queries(source: str, digits: torch.Tensor) -> list[Query]:
    """Queries over a stacked source whose images 2q, 2q + 1 are query q's.

    Args:
        source: tensor-source name (``idtest`` or ``oodtest``).
        digits: digits of each query's two images, (Q, 2).

    Returns:
        Q queries labelled with their sums.
    """
    positions = torch.arange(digits.numel()).view(-1, 2)  # (Q, 2)
    return pair_queries(source, positions, digits)


def read_params(params: dict[str, Any]) -> WorldParams:
    """The checked ``task:`` section of a world-sampled task.

    Args:
        params: the ``task:`` section of the run config.

    Returns:
        The parameters.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a per-world count out of range.
    """
    p = from_dict(WorldParams, params, prefix="task.")
    check_section(p, "task", n_train_per_world=">= 1", n_val_per_world=">= 0",
                  n_test_per_world=">= 1", seed=SEED)  # fmt: skip
    return p


class _Draw(NamedTuple):
    """The digits (Q, 2) and image indices (Q, 2) of one split's queries."""

    digits: torch.Tensor
    images: torch.Tensor


def _draw_splits(
    task: WorldTask, p: WorldParams, train_y: torch.Tensor, test_y: torch.Tensor
) -> dict[str, _Draw]:
    """Train, val, ID and OOD test draws from one generator seeded with ``p.seed``, in that order
    (the order fixes the images of every seed)."""
    gen = torch.Generator().manual_seed(p.seed)
    plan = {
        "train": (task.train_worlds, p.n_train_per_world, train_y),  # MNIST-train indices
        "val": (task.train_worlds, p.n_val_per_world, train_y),  # MNIST-train indices
        "id": (task.train_worlds, p.n_test_per_world, test_y),  # MNIST-test indices
        "ood": (ood_worlds(task), p.n_test_per_world, test_y),  # MNIST-test indices
    }
    digits = {split: world_digits(worlds, n) for split, (worlds, n, _) in plan.items()}
    return {
        split: _Draw(digits[split], draw_images(digits[split], labels, gen))  # (Q, 2) each
        for split, (_, _, labels) in plan.items()
    }


def build_world_task(
    task: WorldTask, params: dict[str, Any], data_root: str | None, *, verify_official: bool = True
) -> TaskData:
    """Draw a world-sampled pair task's images and build its queries (see the module doc).

    Args:
        task: the worlds, digits and program.
        params: the ``task:`` section of the run config (:class:`WorldParams`).
        data_root: folder with ``MNIST/raw`` (None: $GEDI_NESY_DATA, then the user cache).
        verify_official: passed to :func:`gedi_nesy.data.load_images` (False only for fakes).

    Returns:
        The TaskData; ``test`` is the ID test, ``ood_test`` the OOD test.
    """
    p = read_params(params)
    train_x, train_y = load_images("mnist", "train", data_root, verify_official=verify_official)
    test_x, test_y = load_images("mnist", "test", data_root, verify_official=verify_official)
    d = _draw_splits(task, p, train_y, test_y)
    return TaskData(
        name=task.name,
        program=task.program,
        networks={NETWORK: len(task.digits)},
        sources={
            "train": train_x,
            ID_SOURCE: test_x[d["id"].images.reshape(-1)],  # (2 Q_id, 1, 28, 28), query order
            OOD_SOURCE: test_x[d["ood"].images.reshape(-1)],  # (2 Q_ood, 1, 28, 28), query order
        },
        train=pair_queries("train", d["train"].images, d["train"].digits),
        val=pair_queries("train", d["val"].images, d["val"].digits),
        test=stacked_queries(ID_SOURCE, d["id"].digits),
        concept_images=ID_SOURCE,
        concept_labels=d["id"].digits.reshape(-1),  # (2 Q_id,)
        ood_test=stacked_queries(OOD_SOURCE, d["ood"].digits),
        ood_concept_images=OOD_SOURCE,
        ood_concept_labels=d["ood"].digits.reshape(-1),  # (2 Q_ood,)
        train_labels={"train": train_y},
        info={
            "n_train_queries": len(d["train"].digits),
            "n_val_queries": len(d["val"].digits),
            "n_test": len(d["id"].digits),
            "n_ood_test": len(d["ood"].digits),
            "test_resampling": "none",
        },
    )


def world_audit_spec(task: WorldTask, params: dict[str, Any]) -> AuditSpec:
    """The audit's inputs: the program, ``digit_net``, K and the labelled training worlds.

    Args:
        task: the task.
        params: the ``task:`` section (checked; the audit does not depend on it).

    Returns:
        The :class:`~gedi_nesy.shortcuts.audit.AuditSpec`; a world's label is its sum.
    """
    read_params(params)
    worlds = [((a, b), a + b) for a, b in task.train_worlds]
    return AuditSpec(task.program, NETWORK, len(task.digits), worlds, sum_query)
