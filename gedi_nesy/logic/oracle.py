"""The program as an oracle: the probability of a query when its inputs are known for sure.

The reasoning-shortcut audit (:mod:`gedi_nesy.shortcuts.audit`) and the logic-guided relabelling
(:mod:`gedi_nesy.shortcuts.relabel`) ask the program the same question: what is P(query) when
input ``i`` is, for sure, the ``v_i``-th value of its network's nn/4 domain? Any
:class:`~gedi_nesy.logic.engine.LogicEngine` answers it from a probability table whose rows are
one-hot at ``v_i``; for a program without probabilistic facts the answer is exactly 1 (the
program proves the query with those values) or 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from gedi_nesy.errors import DataError
from gedi_nesy.logic.program import ProbabilityTable

if TYPE_CHECKING:
    from deepproblog.query import Query
    from problog.logic import Term

    from gedi_nesy.logic.engine import LogicEngine

__all__ = ["one_hot_query_prob"]


def one_hot_query_prob(
    engine: LogicEngine,
    network: str,
    query: Query,
    values: Mapping[Term, int],
    *,
    device: torch.device | str | None = None,
) -> float:
    """P(query) when each input ``key`` of ``network`` is, for sure, domain value ``values[key]``.

    Args:
        engine: any logic engine over the program.
        network: the network whose inputs are fixed; K is ``engine.networks[network]``.
        query: a ground query.
        values: input term (e.g. ``tensor(train(3))``) -> index in ``0..K-1`` of its value in
            the network's nn/4 domain; it holds every input the query asks the network about.
        device: where the one-hot table is built; None: the CPU.

    Returns:
        P(query), computed in float64; 0.0 when the query has no proof.

    Raises:
        DataError: ``network`` is not one of the engine's networks, or a value is outside
            ``0..K-1``.
    """
    if network not in engine.networks:
        raise DataError(
            f"network '{network}' is not one of the program's networks "
            f"{sorted(engine.networks)}; name a network of its nn/4 statements"
        )
    k = engine.networks[network]
    index = list(values.values())
    if any(not 0 <= v < k for v in index):
        raise DataError(
            f"values {index} for the inputs of {network}; each must be in 0..{k - 1} (K = {k})"
        )
    rows = torch.eye(k, dtype=torch.float64, device=device)[index]  # (P, K) one-hot rows
    table = ProbabilityTable(list(values), rows)
    probs, provable = engine.query_probs([query], {network: table})  # (1,), (1,)
    return float(probs[0]) if bool(provable[0]) else 0.0
