"""Logic-guided relabelling: the naming of a network's output units (concept values or clusters)
under which the program proves the most training queries.

A network that clusters its inputs well can still name the clusters wrongly: on MNIST-EvenOdd a
run can separate all ten digits and yet call the 2s "6" and the 6s "2", a labelling the logic
loss cannot leave by small gradient steps because every path between the two labellings proves
fewer queries. The count of proved queries can see it. With each input's predicted (argmax)
unit ``c``, a query whose inputs have units ``(c_1, ..., c_P)`` is proved under the naming
``f`` when the program proves it with input ``i`` deterministically ``f(c_i)``. No concept
label is read, only the task labels the logic loss reads too. Like abductive learning (Dai et
al., NeurIPS 2019), this revises the network's symbols by logical consistency, here only their
names, so the clustering itself is kept.

- :func:`best_permutation`: one unit per value; ``f`` is a permutation of the values.
- :func:`best_cluster_map`: more units (clusters) than values (overclustering); ``f`` maps
  every cluster to a value, and every value gets a cluster. A shortcut that merges two digits
  into one value is then a naming too when the digits sit in different clusters, but it can
  prove as many queries as the intended map (on MNIST-Half, 3 + 3 = 6 as well as 2 + 4), and
  more while the network is still trained on the merge. So only maps under which every value
  holds a fair share of the training inputs count (by default at least half the uniform share
  1/K, the assumption of GEDI's prior term loosened by a factor 2): the logic chooses among
  them.

Queries are grouped by (query shape, predicted units): a group's score under ``f`` is the
probability the program gives its query with one-hot inputs at ``f(c_1), ..., f(c_P)`` (1 or 0
for a program without probabilistic facts), asked once per distinct mapped tuple. Both searches
start from a greedy ascent from the current naming (moves of one unit to another value and swaps
of two units' values), whose result is the first bound, and then run a depth-first branch and
bound over the units; a search stopped by its budget still returns at least the ascent's map.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn

from gedi_nesy.errors import ConfigError
from gedi_nesy.logic.oracle import one_hot_query_prob
from gedi_nesy.logic.program import query_term, tensor_keys
from gedi_nesy.shortcuts.audit import assignment_order

if TYPE_CHECKING:
    from deepproblog.query import Query
    from problog.logic import Term

    from gedi_nesy.logic.engine import LogicEngine

__all__ = [
    "Relabelling",
    "best_cluster_map",
    "best_permutation",
    "find_relabelling",
    "permute_units",
]

Score = Callable[[int, tuple[int, ...]], float]  # (group index, mapped values) -> [0, 1]
_EPS = 1e-9


class Relabelling(NamedTuple):
    """What a relabelling search found.

    Attributes:
        mapping: ``mapping[c]`` is the value of output unit ``c`` after relabelling; equal to
            ``current`` when nothing better was found.
        current: the naming before (the identity for a permutation search).
        value: the weighted score of ``mapping``.
        current_value: the weighted score of ``current``.
        total: the summed weight of all groups (the largest possible score).
        nodes: search nodes visited.
        complete: False when the search stopped at ``max_nodes`` (``mapping`` is then the best
            naming found so far by the search's criterion, never worse than ``current`` by it).
        min_usage: inputs predicted as the least-used value under ``mapping`` (cluster maps
            only; None for permutations, which do not change it).
        current_min_usage: the same under ``current``.
    """

    mapping: tuple[int, ...]
    current: tuple[int, ...]
    value: float
    current_value: float
    total: float
    nodes: int
    complete: bool
    min_usage: float | None = None
    current_min_usage: float | None = None

    @property
    def changed(self) -> bool:
        return self.mapping != self.current


class _Search:
    """Depth-first branch and bound; assigns unit ``order[step]`` a value at each depth.

    With ``injective`` every value goes to at most one unit (a permutation when there are as
    many units as values); otherwise every value must get at least one unit. With a
    ``min_usage`` > 0 only maps under which every value holds at least that many inputs count.
    """

    def __init__(self, k: int, current: Sequence[int], groups, score: Score, usage,
                 *, injective: bool, max_nodes: int) -> None:  # fmt: skip
        self.k, self.m, self.current = k, len(current), list(current)
        self.groups, self.score, self.usage = groups, score, usage
        self.injective, self.max_nodes = injective, max_nodes
        self.order = assignment_order(self.m, [(units, None) for units, _ in groups])
        step_of = {c: step for step, c in enumerate(self.order)}
        self.due: list[list[int]] = [[] for _ in range(self.m)]
        self.groups_of: list[set[int]] = [set() for _ in range(self.m)]  # groups reading unit c
        for g, (units, _) in enumerate(groups):
            self.due[max(step_of[c] for c in units)].append(g)
            for c in units:
                self.groups_of[c].add(g)
        # weight of the groups still open after depth `step` is assigned
        self.open_after = [sum(groups[g][1] for s in range(step + 1, self.m) for g in self.due[s])
                           for step in range(self.m)]  # fmt: skip
        # inputs of the units still unassigned after depth `step`
        self.free_after = [sum(usage[c] for c in self.order[step + 1 :]) for step in range(self.m)]
        self.memo: dict[tuple[int, tuple[int, ...]], float] = {}
        self.nodes, self.complete = 0, True

    def group_value(self, g: int, f: Sequence[int]) -> float:
        units, weight = self.groups[g]
        mapped = tuple(f[c] for c in units)
        if (g, mapped) not in self.memo:
            p = float(self.score(g, mapped))
            if not 0.0 <= p <= 1.0 + _EPS:
                raise ConfigError(f"relabelling score {p} for group {g} is outside [0, 1]")
            self.memo[(g, mapped)] = p
        return weight * self.memo[(g, mapped)]

    def value_of(self, f: Sequence[int]) -> float:
        return sum(self.group_value(g, f) for g in range(len(self.groups)))

    def min_usage_of(self, f: Sequence[int]) -> float:
        counts = [0.0] * self.k
        for c, v in enumerate(f):
            counts[v] += self.usage[c]
        return min(counts)

    def search(self, min_usage: float) -> tuple[tuple[int, ...], float] | None:
        """The best-scoring map (the current one unless another scores strictly more) under
        which every value holds at least ``min_usage`` inputs, and its score; None if none."""
        self.min_usage, self.nodes, self.complete = min_usage, 0, True
        self.best: tuple[int, ...] | None = None
        self.best_value = -1.0
        start, start_value = self.climb(min_usage)
        if self.min_usage_of(start) >= min_usage - _EPS:
            self.best, self.best_value = start, start_value
        self._run([-1] * self.m, [0] * self.k, [0.0] * self.k, 0, 0.0)
        return None if self.best is None else (self.best, self.best_value)

    def climb(self, min_usage: float) -> tuple[tuple[int, ...], float]:
        """Greedy ascent from the current map and its score. A move gives one unit another
        value or swaps two units' values, keeping the search's constraint; it is taken when it
        lowers the inputs the values lack to reach ``min_usage``, or at an equal lack raises
        the score. Stops when no move does (a local optimum: the current map when it meets
        the floor and no move proves more)."""
        f = list(self.current)
        n_units, counts = [0] * self.k, [0.0] * self.k
        for c, v in enumerate(f):
            n_units[v] += 1
            counts[v] += self.usage[c]

        def move(assign: list[tuple[int, int]]) -> None:
            for c, v in assign:
                n_units[f[c]] -= 1
                counts[f[c]] -= self.usage[c]
                f[c] = v
                n_units[v] += 1
                counts[v] += self.usage[c]

        improved = True
        while improved:
            improved = False
            for assign in self._moves(f, n_units):
                touched = set().union(*(self.groups_of[c] for c, _ in assign))
                before = sum(self.group_value(g, f) for g in touched)
                old_lack = _lack(counts, min_usage)
                undo = [(c, f[c]) for c, _ in assign]
                move(assign)
                gain = sum(self.group_value(g, f) for g in touched) - before
                new_lack = _lack(counts, min_usage)
                if new_lack < old_lack - _EPS or (new_lack <= old_lack + _EPS and gain > _EPS):
                    improved = True
                else:
                    move(undo)
        return tuple(f), self.value_of(f)

    def _moves(self, f: list[int], n_units: list[int]):
        """The moves of :meth:`climb` from ``f``, as lists of (unit, new value); read lazily,
        so each is checked against the map as it is then."""
        for c in range(self.m):
            for v in range(self.k):
                if v != f[c] and n_units[f[c]] > 1 and not (self.injective and n_units[v]):
                    yield [(c, v)]
        for a, b in itertools.combinations(range(self.m), 2):
            if f[a] != f[b]:
                yield [(a, f[b]), (b, f[a])]

    def _run(self, f: list[int], n_units: list[int], counts: list[float], step: int,
             value: float) -> None:  # fmt: skip
        if step == self.m:
            if value > self.best_value + _EPS:
                self.best, self.best_value = tuple(f), value
            return
        unit = self.order[step]
        current = self.current[unit]
        uncovered = sum(n == 0 for n in n_units)
        for v in [current] + [v for v in range(self.k) if v != current]:  # current name first
            if self.injective and n_units[v]:
                continue
            if uncovered - (n_units[v] == 0) > self.m - step - 1:
                continue  # too few units left to give every value one
            if self.nodes >= self.max_nodes:
                self.complete = False
                return
            self.nodes += 1
            f[unit] = v
            n_units[v] += 1
            counts[v] += self.usage[unit]
            gained = value + sum(self.group_value(g, f) for g in self.due[step])
            if gained + self.open_after[step] > self.best_value + _EPS and self._can_fill(
                counts, step
            ):
                self._run(f, n_units, counts, step + 1, gained)
            f[unit] = -1
            n_units[v] -= 1
            counts[v] -= self.usage[unit]

    def _can_fill(self, counts: list[float], step: int) -> bool:
        """Whether the inputs of the units still unassigned can lift every value to the floor
        (always, without a floor: the permutation search skips the sum)."""
        if self.min_usage <= 0.0:
            return True
        return _lack(counts, self.min_usage) <= self.free_after[step] + _EPS


def _lack(counts: Sequence[float], floor: float) -> float:
    """The inputs the values still lack to hold ``floor`` each, given ``counts`` per value."""
    return sum(max(0.0, floor - c) for c in counts)


def _check(k: int, m: int, groups, max_nodes: int) -> None:
    if k < 1 or max_nodes < 1:
        raise ConfigError(f"k = {k}, max_nodes = {max_nodes}; both must be >= 1")
    for units, weight in groups:
        if not units or any(not 0 <= c < m for c in units) or weight < 0:
            raise ConfigError(
                f"relabelling group {(units, weight)}: units must be 1 or more integers in "
                f"0..{m - 1} and the weight >= 0"
            )


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
        The :class:`Relabelling` (``current`` is the identity). Ties keep the identity: a
        permutation is only returned when it scores more than the current labelling.

    Raises:
        ConfigError: k < 1, a value outside 0..k-1, a negative weight, max_nodes < 1, or a
            score outside [0, 1].
    """
    _check(k, k, groups, max_nodes)
    identity = tuple(range(k))
    search = _Search(k, identity, list(groups), score, [0.0] * k, injective=True,
                     max_nodes=max_nodes)  # fmt: skip
    perm, value = search.search(0.0)
    total = float(sum(w for _, w in groups))
    return Relabelling(perm, identity, value, search.value_of(identity), total, search.nodes,
                       search.complete)  # fmt: skip


def best_cluster_map(
    k: int,
    current: Sequence[int],
    groups: Sequence[tuple[tuple[int, ...], float]],
    score: Score,
    usage: Sequence[float],
    *,
    min_share: float = 0.5,
    max_nodes: int = 200_000,
) -> Relabelling:
    """The map ``f`` from clusters to values (every value has a cluster) maximising
    ``sum_g w_g * score(g, f(clusters_g))`` among the maps under which every value holds at
    least ``min_share / k`` of the inputs, ``sum_{c: f(c) = v} usage[c]``; among all maps when
    none does. Ties keep ``current``.

    Args:
        k: the number of values.
        current: the value of each cluster now, M >= k integers in 0..k-1.
        groups: ``(clusters, weight)`` per group of queries: the predicted clusters of the
            query's inputs, in order, and how many queries the group holds.
        score: ``score(g, mapped)`` in [0, 1] for the values ``mapped`` of group ``g``'s
            inputs; called once per distinct (g, mapped).
        usage: inputs predicted as each cluster, (M,) numbers >= 0.
        min_share: the least usage of a value, as a share of the uniform usage ``1 / k``, in
            [0, 1]; 0 lets the logic alone choose (merges included).
        max_nodes: search budget; ``complete`` says whether the search ended.

    Returns:
        The :class:`Relabelling`, with the least usage under ``mapping`` and ``current``.

    Raises:
        ConfigError: a bad size, cluster, value, weight, usage, share or budget, or a score
            outside [0, 1].
    """
    m = len(current)
    if m < k or any(not 0 <= v < k for v in current) or len(usage) != m or min(usage) < 0:
        raise ConfigError(
            f"relabelling: {m} clusters with values {list(current)} and usage {list(usage)}; "
            f"it needs >= k = {k} clusters, values in 0..{k - 1}, one usage >= 0 per cluster"
        )
    if not 0.0 <= min_share <= 1.0:
        raise ConfigError(
            f"optim.relabel_min_share = {min_share}; it must be in [0, 1] (a share of 1/K)"
        )
    _check(k, m, groups, max_nodes)
    groups, total = list(groups), float(sum(w for _, w in groups))
    search = _Search(k, current, groups, score, [float(u) for u in usage], injective=False,
                     max_nodes=max_nodes)  # fmt: skip
    found = search.search(min_share * sum(usage) / k)
    complete, nodes = search.complete, search.nodes
    if found is None:  # no map uses every value enough: the logic alone decides
        found = search.search(0.0)
        complete, nodes = complete and search.complete, nodes + search.nodes
    mapping, value = found if found is not None else (tuple(current), search.value_of(current))
    return Relabelling(
        mapping, tuple(current), value, search.value_of(current), total, nodes, complete,
        search.min_usage_of(mapping), search.min_usage_of(current),
    )  # fmt: skip


class _QueryGroup(NamedTuple):
    """The queries of one shape whose inputs have the same predicted units."""

    shape: str  # the query term with its inputs numbered: addition(#0, #1, 7)
    units: tuple[int, ...]  # the predicted unit of each input, in order
    query: Query  # the group's first query
    keys: list[Term]  # its inputs, in order
    count: int  # queries in the group


def _group_queries(queries: Sequence[Query], unit_of: Mapping[Term, int]) -> list[_QueryGroup]:
    """Group queries by (shape, predicted units), in order of first appearance."""
    groups: dict[tuple[str, tuple[int, ...]], list] = {}  # -> [query, keys, count]
    for q in queries:
        keys = tensor_keys([q])
        shape = str(query_term(q))
        for i, key in enumerate(keys):
            shape = shape.replace(str(key), f"#{i}")
        units = tuple(unit_of[key] for key in keys)
        groups.setdefault((shape, units), [q, keys, 0])[2] += 1
    return [_QueryGroup(shape, units, *entry) for (shape, units), entry in groups.items()]


def find_relabelling(
    engine: LogicEngine,
    network: str,
    unit_of: Mapping[Term, int],
    queries: Sequence[Query],
    k: int,
    *,
    current: Sequence[int] | None = None,
    min_share: float = 0.5,
    max_nodes: int = 200_000,
    device: torch.device | str | None = None,
) -> Relabelling:
    """The naming of a network's output units under which the program proves the most queries.

    Queries are grouped by (shape, predicted units); a group's score under a naming is the
    program's probability of its query with one-hot inputs at the named values
    (:func:`~gedi_nesy.logic.oracle.one_hot_query_prob`), asked once per (shape, values).

    Args:
        engine: the logic engine over the program.
        network: the relabelled network (the only one the queries reach).
        unit_of: input term -> its predicted (argmax) unit, for every input of ``queries``.
        queries: the queries that score a naming (e.g. the training queries).
        k: the size of the network's nn/4 domain.
        current: the value of each unit (cluster) now, for an overclustered network: the
            search is :func:`best_cluster_map`, with each unit's usage counted over the
            queries' inputs; None: one unit per value, the search is :func:`best_permutation`.
        min_share: the least usage of a value under a cluster map, as a share of ``1 / k``.
        max_nodes: search budget.
        device: where the oracle's one-hot tables are built.

    Returns:
        The :class:`Relabelling` (not applied); scores count queries.
    """
    groups = _group_queries(queries, unit_of)
    proved: dict[tuple[str, tuple[int, ...]], float] = {}  # groups of one shape share it

    def score(g: int, mapped: tuple[int, ...]) -> float:
        group = groups[g]
        if (group.shape, mapped) not in proved:
            values = dict(zip(group.keys, mapped))
            p = one_hot_query_prob(engine, network, group.query, values, device=device)
            proved[(group.shape, mapped)] = p
        return proved[(group.shape, mapped)]

    weighted = [(group.units, float(group.count)) for group in groups]
    if current is None:
        return best_permutation(k, weighted, score, max_nodes=max_nodes)
    usage = [0] * len(current)  # inputs predicted as each unit
    for key in tensor_keys(queries):
        usage[unit_of[key]] += 1
    return best_cluster_map(
        k, current, weighted, score, usage, min_share=min_share, max_nodes=max_nodes
    )


def permute_units(layer: nn.Linear, perm: Sequence[int], optimizer: torch.optim.Optimizer) -> None:
    """Output unit ``c`` becomes unit ``perm[c]``: the rows of the weights and bias move, and
    with them the optimiser's per-parameter state of the same shape (Adam's moments).

    Args:
        layer: the output layer, (M, D) weights.
        perm: a permutation of ``0..M-1``.
        optimizer: the optimiser of the layer's parameters; its state moves with the rows.
    """
    source = torch.empty(len(perm), dtype=torch.long)
    source[torch.tensor(perm)] = torch.arange(len(perm))  # new row j <- old row source[j]
    for param in layer.parameters():
        param.data.copy_(param.data[source.to(param.device)])
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.copy_(value[source.to(value.device)])
