"""Logic-guided relabelling: the permutation of a network's concept values under which the
program proves the most training queries.

A network that clusters its inputs well can still name the clusters wrongly: on MNIST-EvenOdd a
run can separate all ten digits and yet call the 2s "6" and the 6s "2", a labelling the logic
loss cannot leave by small gradient steps because every path between the two labellings proves
fewer queries. The count of proved queries can see it. With each input's predicted (argmax)
value ``c``, a query whose inputs have values ``(c_1, ..., c_P)`` is proved under the
relabelling ``pi`` when the program proves it with input ``i`` deterministically ``pi(c_i)``.
:func:`best_permutation` finds the ``pi`` that proves the most (weighted) queries by branch and
bound; no concept label is read, only the task labels the logic loss reads too.
Like abductive learning (Dai et al., NeurIPS 2019), this revises the network's symbols by
logical consistency, here only by permutations, so the clustering itself is kept.

Queries are grouped by (query shape, predicted values): a group's score under ``pi`` is the
probability the program gives its query with one-hot inputs at ``pi(c_1), ..., pi(c_P)`` (1 or 0
for a program without probabilistic facts), asked once per distinct mapped tuple.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from gedi_nesy.audit import assignment_order
from gedi_nesy.errors import ConfigError

__all__ = ["Relabelling", "best_permutation"]

Score = Callable[[int, tuple[int, ...]], float]  # (group index, mapped values) -> [0, 1]


class Relabelling(NamedTuple):
    """What :func:`best_permutation` found.

    Attributes:
        perm: ``perm[c]`` is the new value of predicted value ``c``; the identity when nothing
            proves more queries than the current labelling.
        value: the weighted score of ``perm``.
        identity_value: the weighted score of the current labelling (the identity).
        total: the summed weight of all groups (the largest possible score).
        nodes: search nodes visited.
        complete: False when the search stopped at ``max_nodes`` (``perm`` is then the best
            permutation found so far, still never worse than the identity).
    """

    perm: tuple[int, ...]
    value: float
    identity_value: float
    total: float
    nodes: int
    complete: bool


class _Search:
    """Depth-first branch and bound; assigns ``order[step]`` a free value at each depth."""

    def __init__(self, k: int, groups, score: Score, max_nodes: int) -> None:
        self.k, self.groups, self.score, self.max_nodes = k, groups, score, max_nodes
        self.order = assignment_order(k, [(values, None) for values, _ in groups])
        step_of = {c: step for step, c in enumerate(self.order)}
        self.due: list[list[int]] = [[] for _ in range(k)]
        for g, (values, _) in enumerate(groups):
            self.due[max(step_of[c] for c in values)].append(g)
        # weight of the groups still open after depth `step` is assigned
        self.open_after = [sum(groups[g][1] for s in range(step + 1, k) for g in self.due[s])
                           for step in range(k)]  # fmt: skip
        self.memo: dict[tuple[int, tuple[int, ...]], float] = {}
        self.nodes, self.complete = 0, True
        self.best_value, self.best_perm = -1.0, tuple(range(k))

    def group_value(self, g: int, perm: list[int]) -> float:
        values, weight = self.groups[g]
        mapped = tuple(perm[c] for c in values)
        if (g, mapped) not in self.memo:
            p = float(self.score(g, mapped))
            if not 0.0 <= p <= 1.0 + 1e-9:
                raise ConfigError(f"relabelling score {p} for group {g} is outside [0, 1]")
            self.memo[(g, mapped)] = p
        return weight * self.memo[(g, mapped)]

    def run(self, perm: list[int], used: list[bool], step: int, value: float) -> None:
        if step == self.k:
            if value > self.best_value + 1e-9:
                self.best_value, self.best_perm = value, tuple(perm)
            return
        concept = self.order[step]
        preferred = [concept] + [v for v in range(self.k) if v != concept]  # the current name first
        for v in preferred:
            if used[v]:
                continue
            if self.nodes >= self.max_nodes:
                self.complete = False
                return
            self.nodes += 1
            perm[concept], used[v] = v, True
            gained = value + sum(self.group_value(g, perm) for g in self.due[step])
            if gained + self.open_after[step] > self.best_value + 1e-9:
                self.run(perm, used, step + 1, gained)
            perm[concept], used[v] = -1, False


def best_permutation(
    k: int,
    groups: Sequence[tuple[tuple[int, ...], float]],
    score: Score,
    *,
    max_nodes: int = 200_000,
) -> Relabelling:
    """The permutation ``pi`` of ``0..k-1`` maximising ``sum_g w_g * score(g, pi(values_g))``.

    Args:
        k: the number of concept values.
        groups: ``(values, weight)`` per group of queries: the predicted values of the query's
            inputs, in order, and how many queries (or how much weight) the group holds.
        score: ``score(g, mapped)`` in [0, 1]: how well group ``g``'s query is proved when its
            inputs are deterministically ``mapped``; called once per distinct (g, mapped).
        max_nodes: search budget; the result says whether the search completed.

    Returns:
        The :class:`Relabelling`. Ties keep the identity: a permutation is only returned when it
        scores more than the current labelling.

    Raises:
        ConfigError: k < 1, a value outside 0..k-1, a negative weight, max_nodes < 1, or a
            score outside [0, 1].
    """
    if k < 1 or max_nodes < 1:
        raise ConfigError(f"k = {k}, max_nodes = {max_nodes}; both must be >= 1")
    for values, weight in groups:
        if not values or any(not 0 <= c < k for c in values) or weight < 0:
            raise ConfigError(
                f"relabelling group {(values, weight)}: values must be 1 or more integers in "
                f"0..{k - 1} and the weight >= 0"
            )
    search = _Search(k, list(groups), score, max_nodes)
    identity = list(range(k))
    identity_value = sum(search.group_value(g, identity) for g in range(len(groups)))
    search.best_value = identity_value
    search.run([-1] * k, [False] * k, 0, 0.0)
    total = float(sum(w for _, w in groups))
    return Relabelling(search.best_perm, search.best_value, identity_value, total,
                       search.nodes, search.complete)  # fmt: skip
