"""Reasoning-shortcut audit: every deterministic concept map that fits a task's training worlds.

A concept map ``f: {0..K-1} -> {0..K-1}`` sends each true concept (e.g. digit) ``d`` to the
concept index ``f(d)`` that one classifier, shared by all input positions, predicts for it.
``f`` *fits* a training world ``((d_1, ..., d_P), y)`` when the program proves the world's query
with label ``y`` while input ``i`` is deterministically concept ``f(d_i)``. Every fitting map
other than the intended one is a reasoning shortcut (Marconato et al., NeurIPS 2023): it attains
perfect training accuracy with the wrong concepts.

Two parts: :func:`find_concept_maps`, a pure backtracking search over a ``satisfied(concepts,
label) -> bool`` callable, and :class:`ProgramOracle`, which answers that callable with the
program's own semantics (exact DeepProbLog inference through
:class:`~gedi_nesy.logic.dpl.LogicModel` with one-hot probability tables, the oracle of
:mod:`gedi_nesy.logic.oracle`), so no task arithmetic is hard-coded. :func:`audit` joins them.

The search assigns the concepts one at a time, in an order that completes worlds early
(:func:`assignment_order`); after each assignment it checks every world whose concepts are now
all mapped and backtracks on a failure, so it never enumerates all ``K^K`` maps. Each distinct
(mapped world, label) is evaluated once. Concepts that occur in no world are unconstrained and
are enumerated like the others.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from gedi_nesy.errors import ConfigError, ProgramError
from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.logic.oracle import one_hot_query_prob

if TYPE_CHECKING:
    from deepproblog.query import Query

__all__ = [
    "AuditResult",
    "AuditSpec",
    "ProgramOracle",
    "World",
    "assignment_order",
    "audit",
    "audit_to_dict",
    "find_concept_maps",
    "format_audit",
]

World = tuple[tuple[int, ...], Hashable]  # ((d_1, ..., d_P), label)
Satisfied = Callable[[tuple[int, ...], Hashable], bool]
QueryBuilder = Callable[[str, Sequence[int], Hashable], "Query"]

CONCEPT_SOURCE = "concept"  # the oracle names concept c by the input term tensor(concept(c))
_EXACT_TOL = 1e-9


class AuditSpec(NamedTuple):
    """What a task gives the audit; the fields are :func:`audit`'s first arguments, in order.

    Attributes:
        program: the task's program (a ``pathlib.Path`` or the program text).
        network: the network whose concepts are audited.
        domain_size: K, the size of the network's nn/4 domain.
        worlds: the training worlds ``((d_1, ..., d_P), label)``.
        query_builder: ``(source, indices, label) -> Query`` whose i-th input is the term
            ``tensor(source(indices[i]))``, in the form the task's own queries use.
    """

    program: str | os.PathLike[str]
    network: str
    domain_size: int
    worlds: list[World]
    query_builder: QueryBuilder


@dataclass(frozen=True)
class AuditResult:
    """The deterministic concept maps that fit every training world.

    Attributes:
        domain_size: K.
        n_worlds: number of training worlds checked.
        n_maps: number of fitting maps (all of them, whatever the limit).
        n_bijections: number of fitting maps that use every concept index once.
        maps: the first ``limit`` fitting maps the search found, sorted; map ``f`` is the tuple
            ``(f(0), ..., f(K-1))``. All of them when ``n_maps <= limit``.
        bijections: the first ``limit`` fitting bijections found, sorted.
        identity_fits: whether ``f(d) = d`` fits.
        n_checks: distinct (mapped world, label) pairs evaluated by ``satisfied``.
    """

    domain_size: int
    n_worlds: int
    n_maps: int
    n_bijections: int
    maps: list[tuple[int, ...]]
    bijections: list[tuple[int, ...]]
    identity_fits: bool
    n_checks: int


@dataclass
class _Tally:
    """Fitting maps found so far; stores at most ``limit`` of each kind."""

    domain_size: int
    limit: int
    n_maps: int = 0
    n_bijections: int = 0
    maps: list[tuple[int, ...]] = field(default_factory=list)
    bijections: list[tuple[int, ...]] = field(default_factory=list)
    identity_fits: bool = False

    def add(self, f: tuple[int, ...]) -> None:
        self.n_maps += 1
        if len(self.maps) < self.limit:
            self.maps.append(f)
        if len(set(f)) == self.domain_size:
            self.n_bijections += 1
            if len(self.bijections) < self.limit:
                self.bijections.append(f)
        self.identity_fits = self.identity_fits or f == tuple(range(self.domain_size))


def _check_worlds(domain_size: int, worlds: Sequence[World], limit: int) -> None:
    """Raise a ConfigError for a bad K, limit or world."""
    if domain_size < 1:
        raise ConfigError(f"domain_size = {domain_size}; it must be >= 1 (the network's K)")
    if limit < 0:
        raise ConfigError(f"limit = {limit}; it must be >= 0 (how many maps to list)")
    for world in worlds:
        shaped = isinstance(world, tuple | list) and len(world) == 2
        if not (shaped and isinstance(world[0], tuple | list) and len(world[0]) > 0):
            raise ConfigError(
                f"world {world!r} is not of the form ((d_1, ..., d_P), label) with P >= 1; "
                f"fix the task's training worlds"
            )
        bad = [d for d in world[0] if not (isinstance(d, int) and 0 <= d < domain_size)]
        if bad:
            raise ConfigError(
                f"world {world!r} has concept {bad[0]!r}; allowed are the integers "
                f"0..{domain_size - 1} (K = {domain_size}); fix the world or K"
            )


def assignment_order(domain_size: int, worlds: Sequence[World]) -> list[int]:
    """The order in which the search assigns concepts: worlds complete as early as possible.

    Greedy: next comes the concept that completes the most worlds given those already placed;
    ties go to the concept in most worlds, then to the smallest. Pruning starts as soon as a
    world is complete, so this keeps the search tree small (``0, 1, 2, ...`` would leave most
    EvenOdd worlds open until concept 6).

    Args:
        domain_size: K.
        worlds: ``((d_1, ..., d_P), label)``.

    Returns:
        A permutation of ``0..K-1``.
    """
    sets = [set(concepts) for concepts, _ in worlds]
    order: list[int] = []
    while len(order) < domain_size:
        free = [c for c in range(domain_size) if c not in order]
        order.append(max(free, key=lambda c: _order_score(c, sets, set(order))))
    return order


def _order_score(concept: int, sets: list[set[int]], placed: set[int]) -> tuple[int, int, int]:
    """(worlds it completes, worlds it occurs in, -concept): larger goes first."""
    completes = sum(concept in s and s <= placed | {concept} for s in sets)
    return completes, sum(concept in s for s in sets), -concept


def _extend(
    f: list[int],
    step: int,
    order: list[int],
    due: list[list[World]],
    fits: Callable[[tuple[int, ...], Hashable], bool],
    tally: _Tally,
) -> None:
    """Depth-first: try each value of concept ``order[step]``, keep it if the worlds it completes
    (``due[step]``) fit, recurse; a complete assignment is a fitting map."""
    if step == tally.domain_size:
        tally.add(tuple(f))
        return
    concept = order[step]
    for value in range(tally.domain_size):
        f[concept] = value
        if all(fits(tuple(f[c] for c in concepts), label) for concepts, label in due[step]):
            _extend(f, step + 1, order, due, fits, tally)
    f[concept] = -1


def find_concept_maps(
    domain_size: int, worlds: Sequence[World], satisfied: Satisfied, limit: int = 100
) -> AuditResult:
    """All maps ``f: {0..K-1} -> {0..K-1}`` under which every world is satisfied.

    Args:
        domain_size: K.
        worlds: ``((d_1, ..., d_P), label)`` with each ``d_i`` in ``0..K-1``.
        satisfied: ``satisfied((f(d_1), ..., f(d_P)), label)`` is True when a model whose inputs
            are those concept indices proves the label. Called once per distinct argument pair.
        limit: how many maps (and bijections) to list; the counts are always complete.

    Returns:
        The counts, the first ``limit`` maps and bijections, and whether the identity fits.

    Raises:
        ConfigError: K < 1, limit < 0, or a world is malformed or has a concept outside 0..K-1.
    """
    _check_worlds(domain_size, worlds, limit)
    order = assignment_order(domain_size, worlds)
    step_of = {c: step for step, c in enumerate(order)}
    due: list[list[World]] = [[] for _ in range(domain_size)]
    for concepts, label in worlds:
        due[max(step_of[c] for c in concepts)].append((tuple(concepts), label))
    memo: dict[tuple[tuple[int, ...], Hashable], bool] = {}

    def fits(mapped: tuple[int, ...], label: Hashable) -> bool:
        if (mapped, label) not in memo:
            memo[(mapped, label)] = bool(satisfied(mapped, label))
        return memo[(mapped, label)]

    tally = _Tally(domain_size, limit)
    _extend([-1] * domain_size, 0, order, due, fits, tally)
    return AuditResult(
        domain_size=domain_size,
        n_worlds=len(worlds),
        n_maps=tally.n_maps,
        n_bijections=tally.n_bijections,
        maps=sorted(tally.maps),
        bijections=sorted(tally.bijections),
        identity_fits=tally.identity_fits,
        n_checks=len(memo),
    )


def _concept_index(key: Any, source: str) -> int:
    """``tensor(source(c))`` -> c; any other input term is a broken query builder."""
    inner = key.args[0] if key.functor == "tensor" and key.arity == 1 else None
    if inner is None or inner.functor != source or inner.arity != 1:
        raise ProgramError(
            f"the audit's query refers to input {key}; the query builder must name its i-th "
            f"input tensor({source}(indices[i])) with the source and indices it is given"
        )
    return int(inner.args[0])


class ProgramOracle:
    """``satisfied(concepts, label)`` by exact inference on the program itself.

    Input ``i`` of the query is the term ``tensor(concept(c_i))``, whose row in the network's
    probability table is one-hot at column ``c_i`` (the ``c_i``-th element of the nn/4 domain).
    The query then has probability exactly 1 (satisfied) or 0 (not satisfied, or unprovable).

    Args:
        program: a ``pathlib.Path`` to a .pl file, or the program text.
        network: the audited network; the program must use no other network.
        domain_size: K, the size of the network's domain.
        query_builder: ``(source, indices, label) -> Query`` (see :class:`AuditSpec`).

    Raises:
        ProgramError: the program does not parse or its nn/4 statements do not match
            ``{network: domain_size}``.
    """

    def __init__(
        self,
        program: str | os.PathLike[str],
        network: str,
        domain_size: int,
        query_builder: QueryBuilder,
    ) -> None:
        self.logic = LogicModel(program, {network: domain_size})
        self.network = network
        self.domain_size = domain_size
        self.query_builder = query_builder

    def __call__(self, concepts: tuple[int, ...], label: Hashable) -> bool:
        query = self.query_builder(CONCEPT_SOURCE, concepts, label)
        keys = self.logic.referenced_keys([query]).get(self.network, [])
        values = {key: _concept_index(key, CONCEPT_SOURCE) for key in keys}
        p = one_hot_query_prob(self.logic, self.network, query, values)
        if p >= 1.0 - _EXACT_TOL:
            return True
        if p <= _EXACT_TOL:
            return False
        raise ProgramError(
            f"{self.logic.source}: query {query.substitute().query} has probability {p:.6g} with "
            f"deterministic concepts {concepts}; the audit needs a program whose only uncertainty "
            f"is the neural predicate, remove the probabilistic facts"
        )


def audit(
    program: str | os.PathLike[str],
    network: str,
    domain_size: int,
    worlds: Sequence[World],
    query_builder: QueryBuilder,
    limit: int = 100,
) -> AuditResult:
    """Find every deterministic concept map that fits the training worlds under the program.

    Args:
        program: a ``pathlib.Path`` to a .pl file, or the program text.
        network: the network whose concepts are audited (the program's only network).
        domain_size: K, the size of its nn/4 domain.
        worlds: the training worlds ``((d_1, ..., d_P), label)``, concepts as domain indices.
        query_builder: ``(source, indices, label) -> Query`` whose i-th input is
            ``tensor(source(indices[i]))``.
        limit: how many maps (and bijections) to list; the counts are always complete.

    Returns:
        The :class:`AuditResult`.

    Raises:
        ConfigError: bad K, limit or world.
        ProgramError: the program does not match the network, or a query is not deterministic.
    """
    _check_worlds(domain_size, worlds, limit)
    oracle = ProgramOracle(program, network, domain_size, query_builder)
    return find_concept_maps(domain_size, worlds, oracle, limit)


def _map_text(f: tuple[int, ...]) -> str:
    return " ".join(str(v) for v in f)


def format_audit(result: AuditResult) -> str:
    """A short human-readable summary of an audit.

    Args:
        result: the audit's result.

    Returns:
        Lines: the counts, then the listed bijections and maps as ``f(0) ... f(K-1)``.
    """
    k = result.domain_size
    identity = tuple(range(k))
    shortcuts = result.n_maps - int(result.identity_fits)
    lines = [
        f"K = {k}, {result.n_worlds} training worlds: {result.n_maps} deterministic concept maps "
        f"fit ({shortcuts} shortcuts), {result.n_bijections} of them bijections; the identity "
        f"{'fits' if result.identity_fits else 'does NOT fit'}",
    ]
    for title, found, total in (
        ("bijections", result.bijections, result.n_bijections),
        ("maps", result.maps, result.n_maps),
    ):
        shown = "all" if len(found) == total else f"first {len(found)} of"
        lines.append(f"{title} ({shown} {total}), f(0) ... f({k - 1}):")
        lines += [f"  {_map_text(f)}" + ("  (identity)" if f == identity else "") for f in found]
    return "\n".join(lines)


def audit_to_dict(result: AuditResult) -> dict[str, Any]:
    """The audit as plain JSON-ready values (maps as lists).

    Args:
        result: the audit's result.

    Returns:
        A dict with the fields of :class:`AuditResult`.
    """
    out = dataclasses.asdict(result)
    out["maps"] = [list(f) for f in result.maps]
    out["bijections"] = [list(f) for f in result.bijections]
    return out
