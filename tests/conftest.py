"""Shared fixtures: fixed-probability digit tables (DeepProbLog's DummyNet idiom).

Images are named by tensor terms ``tensor(img(i))``. Rows 0-3 of ``digit_probs`` are sparse and
hand-made, so tests can write the expected probability next to each query; rows 4-7 are dense
(a seeded softmax) for comparisons with DeepProbLog's own inference. float64 throughout, so
results can be compared to 1e-9.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

# image i -> {digit: probability}; every other digit has probability 0
HAND_ROWS = {
    0: {1: 0.4, 2: 0.6},
    1: {3: 0.5, 4: 0.5},
    2: {0: 0.1, 9: 0.9},
    3: {7: 1.0},
}
N_DENSE = 4


def fixed_digit_probs() -> torch.Tensor:
    """The fixed table: rows 0-3 from HAND_ROWS, rows 4-7 dense; shape (8, 10), float64."""
    probs = torch.zeros(len(HAND_ROWS) + N_DENSE, 10, dtype=torch.float64)  # (8, 10)
    for i, row in HAND_ROWS.items():
        for digit, p in row.items():
            probs[i, digit] = p
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N_DENSE, 10, generator=gen, dtype=torch.float64)  # (4, 10)
    probs[len(HAND_ROWS) :] = torch.softmax(logits, -1)
    return probs


class FixedTableNet(torch.nn.Module):
    """A stock DeepProbLog network module: image index -> its row of a fixed table."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.probs = probs  # (n, K); a leaf, so tests can read its gradient

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.probs[int(index)]  # (K,)


class IndexSource:
    """A DeepProbLog tensor source: ``tensor(img(i))`` -> the index i as a tensor."""

    def __getitem__(self, args: tuple[Any, ...]) -> torch.Tensor:
        return torch.tensor(int(args[0]))


@pytest.fixture
def digit_probs() -> torch.Tensor:
    """A fresh leaf copy of the fixed table, shape (8, 10), requires_grad."""
    return fixed_digit_probs().requires_grad_()


@pytest.fixture(scope="session")
def img() -> Callable[[int], Any]:
    """``img(i)`` -> the tensor term ``tensor(img(i))`` that names image i."""
    from problog.logic import Constant, Term

    def term(i: int) -> Any:
        return Term("tensor", Term("img", Constant(i)))

    return term


@pytest.fixture
def digit_table(digit_probs: torch.Tensor, img: Callable[[int], Any]) -> dict[str, Any]:
    """``{"digit_net": ProbabilityTable}`` over the 8 fixed images."""
    from gedi_nesy.logic.program import ProbabilityTable

    keys = [img(i) for i in range(digit_probs.shape[0])]
    return {"digit_net": ProbabilityTable(keys, digit_probs)}


@pytest.fixture
def stock_model_factory() -> Callable[..., Any]:
    """Builds DeepProbLog's stock model: stock Network, GraphSemiring, ``set_engine``, no cache.

    ``factory(program_path, probs)`` -> a ``Model`` whose ``digit_net`` reads rows of ``probs``
    through the tensor source ``img``.
    """
    from deepproblog.engines import ExactEngine
    from deepproblog.model import Model
    from deepproblog.network import Network

    def factory(program_path: Any, probs: torch.Tensor) -> Any:
        model = Model(str(program_path), [Network(FixedTableNet(probs), "digit_net")])
        model.set_engine(ExactEngine(model))
        model.add_tensor_source("img", IndexSource())
        return model

    return factory


@pytest.fixture(scope="session")
def count_autograd_nodes() -> Callable[[torch.Tensor], int]:
    """``count(t)`` -> the number of autograd nodes behind tensor ``t`` (the circuit's size)."""

    def count(t: torch.Tensor) -> int:
        seen, stack = set(), [t.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                stack.extend(next_fn for next_fn, _ in fn.next_functions)
        return len(seen)

    return count


@pytest.fixture
def crash_joint_training_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], Any]:
    """Patches ``JointTrainer.train_step`` to raise KeyboardInterrupt when the trainer is at
    ``step`` (the checkpoint of that step is on disk, as after a kill); returns the real method,
    to put back before resuming."""
    from gedi_nesy.train.joint import JointTrainer

    def crash_at(step: int) -> Any:
        real_step = JointTrainer.train_step

        def crashing(self: Any, queries: Any, extra: Any = None) -> Any:
            if self.step == step:
                raise KeyboardInterrupt
            return real_step(self, queries, extra)

        monkeypatch.setattr(JointTrainer, "train_step", crashing)
        return real_step

    return crash_at


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``needs_data`` when GEDI_NESY_DATA does not name the MNIST folder."""
    if os.environ.get("GEDI_NESY_DATA"):
        return
    skip = pytest.mark.skip(reason="set GEDI_NESY_DATA to the raw MNIST folder")
    for item in items:
        if "needs_data" in item.keywords:
            item.add_marker(skip)
