"""MNIST-EvenOdd (rsbench ``shortmnist``): ordered pairs of MNIST digits labelled with their sum.

Construction (shared/docs/shortcuts.md): every ordered world (d1, d2) gets ``n_train_per_world``
(420) train, ``n_val_per_world`` (120) val and ``n_test_per_world`` (60) test samples; each image
is drawn with replacement from the images of its digit, train and val from MNIST-train, test from
MNIST-test (so a val image may also occur in train, as in that construction). Train, val and the
in-distribution (ID) test keep the 16 worlds of ``TRAIN_WORLDS``: 6,720 / 1,920 / 960 queries.
The out-of-distribution (OOD) test holds the other 84 worlds x 60 = 5,040 queries. Train and val
samples of the 84 OOD worlds would be discarded, so they are never drawn.

Draws use one ``torch.Generator`` seeded with ``seed``, in the order train, val, ID test, OOD test;
worlds in the order of ``TRAIN_WORLDS`` and ``ood_worlds()``; ``n`` consecutive queries per world.

Program ``programs/addition.pl`` (network ``digit_net``, K = 10); queries ``addition(p0_0, p1_0,
S)`` with the substitution ``pI_0 -> tensor(source(index))``, as in ``tasks/mnist_addition.py``.

Image sources of the TaskData: ``train`` is MNIST-train (train and val queries index it);
``idtest`` and ``oodtest`` hold the drawn test images stacked in query order (query q uses images
2q and 2q + 1), so concept metrics run on exactly the images the test queries use:
``concept_images = "idtest"``, ``concept_labels`` their digits. ``TaskData.test`` is the ID test;
the OOD queries and the digits of ``oodtest`` come from :func:`ood_split`, which needs no data.
Test sets are plain: no label-balanced resampling (rsbench evaluates through one).

The helpers here (``draw_images``, ``sum_query``, ``build_world_task``, ...) serve every
world-sampled pair task; ``tasks/mnist_half.py`` reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from deepproblog.query import Query
from problog.logic import Constant, Term

from gedi_nesy.config import from_dict
from gedi_nesy.data import load_images
from gedi_nesy.errors import ConfigError, DataError
from gedi_nesy.shortcuts.audit import AuditSpec
from gedi_nesy.task import TaskData

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
NETWORK = "digit_net"
DIGITS = tuple(range(10))
TRAIN_WORLDS = [
    (0, 6), (6, 0), (2, 8), (8, 2), (4, 6), (6, 4), (4, 8), (8, 4),
    (1, 5), (5, 1), (3, 7), (7, 3), (1, 9), (9, 1), (3, 9), (9, 3),
]  # fmt: skip
ID_SOURCE, OOD_SOURCE = "idtest", "oodtest"

World = tuple[int, int]


@dataclass
class EvenOddParams:
    """The ``task:`` section of a config for ``name: mnist_evenodd``."""

    name: str = "mnist_evenodd"
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


class OODSplit(NamedTuple):
    """The OOD test: queries over the source ``source`` and the digit of each of its images."""

    source: str
    queries: list[Query]
    concept_labels: torch.Tensor  # (2 * len(queries),)


EVENODD = WorldTask("mnist_evenodd", PROGRAMS / "addition.pl", DIGITS, TRAIN_WORLDS)


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


def check_params(p: EvenOddParams) -> None:
    """Raise a ConfigError when a per-world count is out of range.

    Args:
        p: the task parameters.
    """
    minimum = {"n_train_per_world": 1, "n_val_per_world": 0, "n_test_per_world": 1}
    for key, low in minimum.items():
        if getattr(p, key) < low:
            raise ConfigError(
                f"task.{key} = {getattr(p, key)}; it must be >= {low} (samples per world)"
            )


def ood_split(task: WorldTask, p: EvenOddParams) -> OODSplit:
    """The OOD test queries and the digits of the ``oodtest`` images; needs no data.

    Args:
        task: the task.
        p: the same parameters the task was built with.

    Returns:
        Queries over ``oodtest`` and its concept labels (the digits, in image order).
    """
    digits = world_digits(ood_worlds(task), p.n_test_per_world)  # (Q, 2)
    return OODSplit(OOD_SOURCE, stacked_queries(OOD_SOURCE, digits), digits.reshape(-1))


def build_world_task(
    task: WorldTask, p: EvenOddParams, data_root: str | None, *, verify_official: bool = True
) -> TaskData:
    """Draw a world-sampled pair task's images and build its queries (see the module doc).

    Args:
        task: the worlds, digits and program.
        p: the checked parameters.
        data_root: folder with ``MNIST/raw`` (None: $GEDI_NESY_DATA, then the user cache).
        verify_official: passed to :func:`gedi_nesy.data.load_images` (False only for fakes).

    Returns:
        The TaskData; ``test`` is the ID test.
    """
    check_params(p)
    train_x, train_y = load_images("mnist", "train", data_root, verify_official=verify_official)
    test_x, test_y = load_images("mnist", "test", data_root, verify_official=verify_official)
    gen = torch.Generator().manual_seed(p.seed)
    train_d = world_digits(task.train_worlds, p.n_train_per_world)  # (Q_train, 2)
    val_d = world_digits(task.train_worlds, p.n_val_per_world)  # (Q_val, 2)
    id_d = world_digits(task.train_worlds, p.n_test_per_world)  # (Q_id, 2)
    ood_d = world_digits(ood_worlds(task), p.n_test_per_world)  # (Q_ood, 2)
    train_i = draw_images(train_d, train_y, gen)  # (Q_train, 2) MNIST-train indices
    val_i = draw_images(val_d, train_y, gen)  # (Q_val, 2) MNIST-train indices
    id_i = draw_images(id_d, test_y, gen)  # (Q_id, 2) MNIST-test indices
    ood_i = draw_images(ood_d, test_y, gen)  # (Q_ood, 2) MNIST-test indices
    return TaskData(
        name=task.name,
        program=task.program,
        networks={NETWORK: len(task.digits)},
        sources={
            "train": train_x,
            ID_SOURCE: test_x[id_i.reshape(-1)],  # (2 Q_id, 1, 28, 28), query order
            OOD_SOURCE: test_x[ood_i.reshape(-1)],  # (2 Q_ood, 1, 28, 28), query order
        },
        train=pair_queries("train", train_i, train_d),
        val=pair_queries("train", val_i, val_d),
        test=stacked_queries(ID_SOURCE, id_d),
        concept_images=ID_SOURCE,
        concept_labels=id_d.reshape(-1),  # (2 Q_id,)
        ood_test=stacked_queries(OOD_SOURCE, ood_d),
        ood_concept_images=OOD_SOURCE,
        ood_concept_labels=ood_d.reshape(-1),  # (2 Q_ood,)
        train_labels={"train": train_y},
        info={
            "n_train_queries": len(train_d),
            "n_val_queries": len(val_d),
            "n_test": len(id_d),
            "n_ood_test": len(ood_d),
            "test_resampling": "none",
        },
    )


def world_audit_spec(task: WorldTask) -> AuditSpec:
    """The audit's inputs: the program, ``digit_net``, K and the labelled training worlds.

    Args:
        task: the task.

    Returns:
        The :class:`~gedi_nesy.shortcuts.audit.AuditSpec`; a world's label is its sum.
    """
    worlds = [((a, b), a + b) for a, b in task.train_worlds]
    return AuditSpec(task.program, NETWORK, len(task.digits), worlds, sum_query)


def build(
    params: dict[str, Any], data_root: str | None, *, verify_official: bool = True
) -> TaskData:
    """Build MNIST-EvenOdd from its config section.

    Args:
        params: the ``task:`` section of the run config.
        data_root: folder with ``MNIST/raw`` (None: $GEDI_NESY_DATA, then the user cache).
        verify_official: check the MNIST files are the official release; False only for fakes.

    Returns:
        The task; ``test`` is the ID test (960 queries by default), OOD: :func:`build_ood`.
    """
    p = from_dict(EvenOddParams, params, prefix="task.")
    return build_world_task(EVENODD, p, data_root, verify_official=verify_official)


def build_ood(params: dict[str, Any]) -> OODSplit:
    """The OOD test (84 worlds x ``n_test_per_world``) over the source ``oodtest`` of ``build``.

    Args:
        params: the same ``task:`` section given to :func:`build`.

    Returns:
        ``OODSplit(source, queries, concept_labels)``.
    """
    p = from_dict(EvenOddParams, params, prefix="task.")
    check_params(p)
    return ood_split(EVENODD, p)


def audit_spec(params: dict[str, Any]) -> AuditSpec:
    """What ``gedi_nesy.shortcuts.audit.audit`` needs for MNIST-EvenOdd (its 16 worlds and their
    sums).

    Args:
        params: the ``task:`` section (checked; the audit does not depend on it).

    Returns:
        ``AuditSpec(programs/addition.pl, "digit_net", 10, worlds, sum_query)``.
    """
    from_dict(EvenOddParams, params, prefix="task.")
    return world_audit_spec(EVENODD)
