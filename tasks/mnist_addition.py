"""MNIST addition (DeepProbLog): sums of N-digit numbers written with MNIST images.

Queries are built as in DeepProbLog's own example: the training images are shuffled with the
task seed and cut into consecutive groups of 2N, so each image is used once (30,000 pairs at
N = 1). ``n_train`` keeps the first queries (the small-data regime); the validation queries come
from images after the last training query's; test queries come from MNIST-test in the same way.
N = 1 uses ``programs/addition.pl`` (``addition(X, Y, Z)``); N > 1 uses
``programs/multi_addition.pl`` (``add([X1, ..., XN], [Y1, ..., YN], Z)``, digits most significant
first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepproblog.query import Query
from problog.logic import Constant, Term, list2term

from gedi_nesy.config import SEED, check_section
from gedi_nesy.data import load_images
from gedi_nesy.errors import ConfigError
from gedi_nesy.schema import from_dict
from gedi_nesy.task import TaskData

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"


@dataclass
class AdditionParams:
    """The ``task:`` section of a config for ``name: mnist_addition``."""

    name: str = "mnist_addition"
    n_digits: int = 1  # N: digits per number
    n_train: int | None = None  # None: every training query (60,000 / 2N)
    n_val: int = 500  # validation queries, from images the training queries do not use
    n_test: int | None = None  # None: every test query (10,000 / 2N)
    n_unlabelled: int = 0  # extra training images for the GEDI terms only
    seed: int = 0  # shuffles the images before they are grouped into queries


def digits_to_number(digits: list[int]) -> int:
    """[1, 2, 3] -> 123 (most significant digit first)."""
    number = 0
    for d in digits:
        number = 10 * number + int(d)
    return number


def addition_queries(
    indices: torch.Tensor, labels: torch.Tensor, source: str, n_digits: int
) -> list[Query]:
    """One query per consecutive group of 2N image indices (leftover images are dropped).

    Args:
        indices: image indices into the source, in the order they are grouped, (M,).
        labels: the digit of every image of the source, (N_source,).
        source: tensor-source name (``train`` or ``test``).
        n_digits: N.

    Returns:
        Queries ``addition(p0_0, p1_0, S)`` (N = 1) or ``add([p0_0..], [p1_0..], S)`` with the
        substitution ``pI_J -> tensor(source(index))``, as DeepProbLog's example builds them.
    """
    per_query = 2 * n_digits
    groups = indices[: len(indices) // per_query * per_query].view(-1, 2, n_digits)  # (Q, 2, N)
    queries = []
    for group in groups.tolist():
        subs, numbers, arguments = {}, [], []
        for i, number_images in enumerate(group):
            names = [Term(f"p{i}_{j}") for j in range(n_digits)]
            for name, index in zip(names, number_images):
                subs[name] = Term("tensor", Term(source, Constant(index)))
            numbers.append(digits_to_number(labels[number_images].tolist()))
            arguments.append(names[0] if n_digits == 1 else list2term(names))
        functor = "addition" if n_digits == 1 else "add"
        term = Term(functor, *arguments, Constant(sum(numbers)))
        queries.append(Query(term, subs))
    return queries


def _check_counts(p: AdditionParams, spare_images: int, n_test: int) -> None:
    """Refuse more unlabelled images or test queries than the data hold (not fewer, silently)."""
    if p.n_unlabelled > spare_images:
        raise ConfigError(
            f"task.n_unlabelled = {p.n_unlabelled}, but MNIST-train holds {spare_images} images "
            "the training and validation queries do not use; lower n_unlabelled or n_train"
        )
    if p.n_test is not None and p.n_test > n_test:
        raise ConfigError(
            f"task.n_test = {p.n_test}, but MNIST-test makes {n_test} queries; lower it, or set "
            "it to null for all of them"
        )


def build(params: dict[str, Any], data_root: str | None) -> TaskData:
    """Build the MNIST-addition task from its config section.

    Args:
        params: the ``task:`` section of the run config.
        data_root: folder with ``MNIST/raw`` (None: $GEDI_NESY_DATA, then the user cache).

    Returns:
        The task's program, network, image sources and queries.
    """
    p = from_dict(AdditionParams, params, prefix="task.")
    check_section(p, "task", n_digits=">= 1", n_train=">= 1", n_val=">= 0", n_test=">= 1",
                  n_unlabelled=">= 0", seed=SEED)  # fmt: skip
    train_x, train_y = load_images("mnist", "train", data_root)
    test_x, test_y = load_images("mnist", "test", data_root)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(p.seed))
    per_query = 2 * p.n_digits
    n_available = len(train_x) // per_query
    n_train = n_available - p.n_val if p.n_train is None else p.n_train
    if n_train < 1 or n_train + p.n_val > n_available:
        raise ConfigError(
            f"task.n_train = {p.n_train} with task.n_val = {p.n_val}: n_train must be >= 1 and "
            f"n_train + n_val <= {n_available} (MNIST-train makes {n_available} queries of "
            f"{per_query} images); change n_train or n_val"
        )
    used = (n_train + p.n_val) * per_query
    _check_counts(p, len(train_x) - used, len(test_x) // per_query)
    train = addition_queries(order[: n_train * per_query], train_y, "train", p.n_digits)
    val = addition_queries(order[n_train * per_query : used], train_y, "train", p.n_digits)
    test = addition_queries(torch.arange(len(test_x)), test_y, "test", p.n_digits)
    test = test if p.n_test is None else test[: p.n_test]
    return TaskData(
        name=f"mnist_addition_n{p.n_digits}",
        program=PROGRAMS / ("addition.pl" if p.n_digits == 1 else "multi_addition.pl"),
        networks={"digit_net": 10},
        sources={"train": train_x, "test": test_x},
        train=train,
        val=val,
        test=test,
        concept_images="test",
        concept_labels=test_y,
        train_labels={"train": train_y},
        unlabelled={"train": order[used : used + p.n_unlabelled]},
        info={"n_train_queries": len(train), "n_val_queries": len(val), "n_test": len(test)},
    )
