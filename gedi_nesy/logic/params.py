"""A program's ``t(...)`` learnable probabilities, trained as DeepProbLog 2.1 trains them.

DeepProbLog keeps each ``t(...)`` as a plain float (``Model.parameters``), starts ``t(p)`` at p
and ``t(_)`` at ``random.random()``, reads it as a fresh leaf tensor in every circuit, and its
``SGD`` optimiser steps ``p <- p - lr * dL/dp``, clamps p to [0, 1] and divides the entries of
each annotated disjunction by their sum. :class:`ProbabilityParameters` holds the same values
as one (P,) float64 ``nn.Parameter`` that both engines read with autograd, so the logic loss's
``backward`` gives dL/dp as DeepProbLog's hooks accumulate it; :class:`ProjectedSGD` (a plain
``torch.optim.SGD`` step, then :meth:`ProbabilityParameters.project_`) is DeepProbLog's update.

Where we differ, and why: no softmax or sigmoid reparametrisation (DeepProbLog has none; the
projection keeps its values and gradients comparable to 1e-12); a disjunction whose entries all
clamp to 0 becomes uniform instead of a division by zero; the probabilities are read in the
tables' dtype (DeepProbLog reads them in torch's default dtype, float32 unless changed).

In the circuits a parameter is a leaf of the pseudo-network :data:`PARAMETER_NETWORK`, whose one
row (key :data:`PARAMETER_KEY`) holds the P values, so the compiled engine batches it like any
table.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from problog.logic import Term

from gedi_nesy.logic.program import LearnableFact, learnable_facts

__all__ = [
    "PARAMETER_KEY",
    "PARAMETER_NETWORK",
    "ProbabilityParameters",
    "ProjectedSGD",
    "keep_random_state",
    "project_probabilities",
]

PARAMETER_NETWORK = "$t"  # not an unquoted Prolog atom: no nn/4 network is named so
PARAMETER_KEY = Term("gedi_parameters")  # the one row of the pseudo-network's table


def project_probabilities(probs: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """DeepProbLog's projection after an SGD step: clamp to [0, 1], then normalise each group.

    Args:
        probs: the parameter values, shape (P,).
        groups: per annotated disjunction, the indices of its entries.

    Returns:
        The projected values, (P,): every entry in [0, 1], every group summing to 1 (a group
        whose entries are all 0 becomes uniform, where DeepProbLog divides by zero).
    """
    out = probs.clamp(0.0, 1.0)  # (P,) p_i <- min(max(p_i, 0), 1)
    for group in groups:
        idx = torch.tensor(list(group), dtype=torch.long, device=probs.device)  # (G,)
        total = out[idx].sum()  # () sum_{j in group} p_j
        if total > 0:
            out[idx] = out[idx] / total  # (G,) p_i / sum_j p_j
        else:
            out[idx] = 1.0 / len(group)  # (G,) uniform
    return out


@contextmanager
def keep_random_state() -> Iterator[None]:
    """Restore Python's global random state afterwards: DeepProbLog's ``Model`` draws a
    ``random.random()`` for each ``t(_)`` it reads, which must not shift a run's random stream
    (whether a circuit comes from the cache or is compiled would change the run)."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


class ProbabilityParameters(nn.Module):
    """The learnable probabilities of a program: ``probs`` (P,) float64, one per ``t(...)``.

    Args:
        facts: the program's learnable facts (:func:`learnable_facts`), in index order.
        draw: the start of a ``t(_)``; default ``random.random`` (Python's global generator,
            as DeepProbLog; a run seeds it with ``optim.seed`` before it builds the engine).

    Attributes:
        probs: the values, an ``nn.Parameter`` of shape (P,), float64; ``probs[i]`` is ``t(i)``.
        groups: per annotated disjunction, the indices of its entries.
        names: one unique name per parameter: its head (``noisy``, ``house_rank(jack)``), with
            ``#i`` after a head that names several.
    """

    def __init__(
        self, facts: Sequence[LearnableFact], draw: Callable[[], float] = random.random
    ) -> None:
        super().__init__()
        values = [draw() if f.initial is None else f.initial for f in facts]  # DPL's order
        self.probs = nn.Parameter(torch.tensor(values, dtype=torch.float64))  # (P,)
        groups: dict[int, list[int]] = {}
        for f in facts:
            if f.group is not None:
                groups.setdefault(f.group, []).append(f.index)
        self.groups = [groups[g] for g in sorted(groups)]
        heads = [f.name for f in facts]
        self.names = [n if heads.count(n) == 1 else f"{n}#{f.index}" for n, f in zip(heads, facts)]

    @classmethod
    def from_program(
        cls, program_text: str, source: str = "<program>"
    ) -> ProbabilityParameters | None:
        """The parameters of a program, or None when it has no ``t(...)``.

        Raises:
            ProgramError: a ``t(...)`` that cannot be trained (see :func:`learnable_facts`).
        """
        facts = learnable_facts(program_text, source)
        return cls(facts) if facts else None

    def __len__(self) -> int:
        return self.probs.shape[0]

    @torch.no_grad()
    def project_(self) -> None:
        """Project the values in place after an optimiser step (:func:`project_probabilities`)."""
        self.probs.copy_(project_probabilities(self.probs, self.groups))

    def values(self) -> dict[str, float]:
        """Name -> current value, for logs and ``metrics.json``."""
        return dict(zip(self.names, self.probs.detach().cpu().tolist()))

    def table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The values as the pseudo-network's one-row table, (1, P), autograd intact."""
        return self.probs.to(device=device, dtype=dtype).view(1, -1)  # (1, P)


class ProjectedSGD:
    """DeepProbLog's ``SGD(model, param_lr)`` on the parameters: ``p <- p - lr * dL/dp`` (the
    gradient the last ``backward`` left), then the projection; a constant rate, no clipping.

    Args:
        parameters: what it trains.
        lr: the learning rate (``optim.param_lr``); 0 leaves the values to the projection alone.
    """

    def __init__(self, parameters: ProbabilityParameters, lr: float) -> None:
        self.parameters = parameters
        self.sgd = torch.optim.SGD([parameters.probs], lr=lr)

    def zero_grad(self) -> None:
        self.sgd.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One SGD step (none without a gradient), then clamp and normalise, as DeepProbLog
        does after every step."""
        self.sgd.step()
        self.parameters.project_()

    def state_dict(self) -> dict[str, Any]:
        """The values and the SGD state, tensors and plain values only."""
        return {"values": self.parameters.state_dict(), "sgd": self.sgd.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.parameters.load_state_dict(state["values"])
        self.sgd.load_state_dict(state["sgd"])
