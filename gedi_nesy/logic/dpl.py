"""The DeepProbLog-backed engine: neural predicates that look up rows of a probability table.

The trainer runs ONE batched forward ``probs = softmax(net(images))`` (n, K) per network over all
images of a minibatch and hands the rows to :class:`LogicModel` as a
:class:`~gedi_nesy.logic.program.ProbabilityTable` keyed by the images' tensor terms
(``tensor(train(17))``). The DeepProbLog network registered under the predicate's name only looks
rows up, so the logic loss and the GEDI losses share one autograd graph, BatchNorm sees the whole
batch, and no image passes through DeepProbLog.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from problog.logic import Term, term2list

from gedi_nesy.errors import DataError
from gedi_nesy.logic.circuit import is_exact
from gedi_nesy.logic.params import ProbabilityParameters, keep_random_state
from gedi_nesy.logic.program import (
    ProbabilityTable,
    QueryProbs,
    answer_columns,
    check_program,
    program_text,
    subterms,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # deepproblog.engines: "PySwip could not be found"
    from deepproblog.engines import ExactEngine
    from deepproblog.model import Model
    from deepproblog.network import Network
    from deepproblog.query import Query
    from deepproblog.semiring.graph_semiring import GraphSemiring
    from deepproblog.solver import Solver

__all__ = ["ExactZeroSemiring", "LogicModel"]


class ExactZeroSemiring(GraphSemiring):
    """DeepProbLog's GraphSemiring with exact-zero and exact-one shortcuts on plain floats.

    Stock 2.1.0 keeps ``x * 0.0`` as a tensor in the autograd graph; the SDD walk creates many
    of them (negated deterministic literals, smoothing), so the graph grows 10-55x and training
    runs 2-3.6x slower. Returning the float 0.0 instead gives identical probabilities and
    gradients: d(x * 0)/dx = 0. Only plain floats are shortcut, never a tensor that happens to
    hold 0 or 1 (its gradient need not be 0).
    """

    def plus(self, a: Any, b: Any) -> Any:
        if is_exact(b, 0.0):
            return a
        if is_exact(a, 0.0):
            return b
        return a + b

    def times(self, a: Any, b: Any) -> Any:
        if is_exact(a, 0.0) or is_exact(b, 0.0):
            return 0.0
        if is_exact(b, 1.0):
            return a
        if is_exact(a, 1.0):
            return b
        return a * b

    def is_one(self, a: Any) -> bool:
        return 1.0 - self.eps <= float(_detach(a)) <= 1.0 + self.eps

    def is_zero(self, a: Any) -> bool:
        return -self.eps <= float(_detach(a)) <= self.eps


def _detach(a: Any) -> Any:
    return a.detach() if isinstance(a, torch.Tensor) else a


class _BoundParameters:
    """The ``t(...)`` values of one solve, (P,) in the tables' dtype (None between solves)."""

    values: torch.Tensor | None = None


class _ParameterSemiring(ExactZeroSemiring):
    """:class:`ExactZeroSemiring` reading ``t(i)`` from the engine's
    :class:`~gedi_nesy.logic.params.ProbabilityParameters` (with autograd) instead of
    DeepProbLog's float list and gradient hooks."""

    def __init__(self, model: Any, substitution: Any, values: Any, bound: _BoundParameters):
        super().__init__(model, substitution, values)
        self.bound = bound

    def value(self, a: Any, key: Any = None) -> Any:
        if type(a) is Term and a.functor == "t":
            return self.bound.values[int(a.args[0])]  # () t(i), autograd to the parameters
        return super().value(a, key)


class _LookupNetwork(Network):
    """A DeepProbLog network that returns rows of the bound :class:`ProbabilityTable`."""

    def __init__(self, name: str) -> None:
        super().__init__(torch.nn.Identity(), name)
        self._table: ProbabilityTable | None = None
        self._probs: torch.Tensor | None = None
        self._rows: dict[Term, tuple[torch.Tensor, ...]] = {}

    def bind(self, table: ProbabilityTable | None, device: torch.device) -> None:
        self._table = table
        self._probs = None if table is None else table.probs.to(device)  # (n, K), keeps autograd
        self._rows = {}

    def __call__(self, to_evaluate: list) -> list:
        return [self._row(inputs[0]) for inputs in to_evaluate]

    def _row(self, key: Term) -> tuple[torch.Tensor, ...]:
        if key in self._rows:
            return self._rows[key]
        if self._table is None:
            raise DataError(
                f"a query needs network '{self.name}' for {key}, but no probability table was "
                f"given for it; pass tables={{'{self.name}': ProbabilityTable(...)}}"
            )
        i = self._table.index.get(key)
        if i is None:
            raise DataError(
                f"the probability table of network '{self.name}' has no row for {key} "
                f"({len(self._table.keys)} keys); forward every input the queries refer to"
            )
        row = self._probs[i].unbind(0)  # K scalars of (K,); the semiring indexes row[j]
        self._rows[key] = row
        return row


def _shareable(query: Query) -> Query:
    """The query itself, or its ground form when its substitution aliases one input twice.

    A cached circuit is compiled for the query before substitution, where distinct placeholders
    are independent variables; if two of them (or a placeholder and a term already in the
    query) name the same input, the shared circuit would count that input twice. Such a query
    is solved in ground form (its own circuit) instead.
    """
    values = list(query.substitution.values())
    if not values:
        return query
    present = set(subterms(query.query))
    if len(set(values)) == len(values) and not any(v in present for v in values):
        return query
    return Query(query.substitute().query, None, query.p, query.output_ind)


def _as_float(p: Any) -> float:
    """A probability (tensor or float) as a plain float."""
    return float(p.detach()) if isinstance(p, torch.Tensor) else float(p)


def _scalars(values: Sequence[Any], like: Any, device: torch.device) -> torch.Tensor:
    """Stack tensors and plain floats (constant probabilities) into one (len,) tensor."""
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    items = [
        v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=dtype, device=device)
        for v in values
    ]
    return torch.stack([v.to(dtype=dtype, device=device) for v in items])  # (len,)


class LogicModel:
    """A ProbLog program with lookup neural predicates, solved by exact inference.

    Owns a DeepProbLog ``Model`` with the exact engine, :class:`ExactZeroSemiring`, and the
    in-memory circuit cache (``cache=True``; no ``cache_root``: DeepProbLog names cache files by
    Python's per-process string hash, so an on-disk cache never hits in a new process). The
    cache is keyed by the query term before substitution: build queries with placeholders and a
    substitution (``addition(p0, p1, 7)``, ``{p0: tensor(train(3)), ...}``) and every query of
    the same shape shares one compiled circuit. A query whose substitution names one input twice
    gets its own circuit (shared placeholders would count it as two independent inputs, a bug of
    stock DeepProbLog's cache).

    A ``t(...)`` learnable probability is read from :attr:`parameters`
    (:class:`~gedi_nesy.logic.params.ProbabilityParameters`) with autograd; DeepProbLog's own
    float copy and gradient hooks are not used.

    DeepProbLog's tensor builtins (``add/3``, ``mul/3``, ``less_than/2``, ...) are not
    registered: lookup networks never see tensors, and ``add/3`` is free for programs.

    Args:
        program: a ``pathlib.Path`` to a .pl file, or the program text as a ``str``.
        networks: network name -> number of outputs K; checked by :func:`check_program`.
        device: where the logic runs; tables are moved there, autograd intact (CPU is fastest
            for DeepProbLog's scalar ops).
        sdd_auto_gc: let the SDD library garbage-collect and reorder variables while compiling;
            keeps multi-digit circuits near-linear in N (without it the SDD of a 4-digit
            addition query is ~14x larger and its autograd graph ~6x).

    Attributes:
        parameters: the program's ``t(...)`` probabilities, or None when it has none.

    Inference is many tiny scalar ops: run it with ``torch.set_num_threads(1)`` (5x faster
    than 2 threads on a 2-core machine); the trainer sets it.
    """

    def __init__(
        self,
        program: str | os.PathLike[str],
        networks: Mapping[str, int],
        *,
        device: str | torch.device = "cpu",
        sdd_auto_gc: bool = True,
    ) -> None:
        text, self.source = program_text(program)
        self.declarations = check_program(text, networks, self.source)
        self.networks = dict(networks)
        self.device = torch.device(device)
        self.parameters = ProbabilityParameters.from_program(text, self.source)
        self._parameter_values = _BoundParameters()
        self._lookups = {name: _LookupNetwork(name) for name in networks}
        with keep_random_state():  # its t(...) floats are never read, see _ParameterSemiring
            self.model = Model(text, list(self._lookups.values()), load=False)
        semiring = functools.partial(_ParameterSemiring, bound=self._parameter_values)
        with contextlib.redirect_stdout(io.StringIO()):  # its Solver prints "Caching ACs"
            self.model.solver = Solver(
                self.model,
                ExactEngine(self.model),
                semiring=semiring,
                cache=True,
                sdd_auto_gc=sdd_auto_gc,
            )

    @contextmanager
    def _bound(self, tables: Mapping[str, ProbabilityTable]) -> Iterator[None]:
        """Bind the tables to the lookup networks for one solve."""
        for name, table in tables.items():
            if name not in self._lookups:
                raise DataError(
                    f"got a probability table for '{name}', but the registered networks are "
                    f"{sorted(self._lookups)}; key tables by network name"
                )
            k = self.networks[name]
            if table.probs.shape[1] != k:
                raise DataError(
                    f"the table of '{name}' has {table.probs.shape[1]} columns, the network "
                    f"has K = {k}; give one column per element of its nn/4 domain"
                )
        try:
            for name, network in self._lookups.items():
                network.bind(tables.get(name), self.device)
            if self.parameters is not None:
                dtype = next((t.probs.dtype for t in tables.values()), torch.get_default_dtype())
                self._parameter_values.values = self.parameters.probs.to(self.device, dtype)
            yield
        finally:
            for network in self._lookups.values():
                network.bind(None, self.device)
            self._parameter_values.values = None

    def query_probs(
        self, queries: Sequence[Query], tables: Mapping[str, ProbabilityTable]
    ) -> QueryProbs:
        """Probability of each ground query, differentiable w.r.t. the tables.

        Args:
            queries: ground queries (after their substitution).
            tables: network name -> probability table holding every input the queries refer to.

        Returns:
            ``QueryProbs(probs (Q,), provable (Q,))``: a query with no proof gets probability 0
            and ``provable = False``; the caller decides its loss.

        Raises:
            DataError: a query is not ground, or a table lacks a row a query needs.
        """
        for q in queries:
            if not q.substitute().query.is_ground():
                raise DataError(
                    f"query {q.substitute().query} has free variables; query_probs needs ground "
                    f"queries, use answer_probs or best_answers for an output variable"
                )
        with self._bound(tables):
            results = self.model.solve([_shareable(q) for q in queries])
        values, provable = [], []
        for q, result in zip(queries, results, strict=True):
            provable.append(any(node is not None for _, node in result.proof.queries()))
            values.append(result.result[q.substitute().query])  # 0.0 (a float) if unprovable
        like = next((v for v in values if isinstance(v, torch.Tensor)), None)
        probs = _scalars(values, like, self.device)  # (Q,)
        return QueryProbs(probs, torch.tensor(provable, dtype=torch.bool, device=self.device))

    def answers(
        self, queries: Sequence[Query], tables: Mapping[str, ProbabilityTable]
    ) -> list[dict[Term, Any]]:
        """The distribution over each query's output argument (``Query.output_ind``, one index).

        Args:
            queries: queries whose output argument is replaced by a variable before solving
                (its given value is ignored).
            tables: network name -> probability table, as for :meth:`query_probs`.

        Returns:
            Per query, answer term -> probability (tensor, or float for a constant); an empty
            dict when no answer is provable.
        """
        for q in queries:
            if len(q.output_ind) != 1:
                raise DataError(
                    f"query {q.query} has output indices {tuple(q.output_ind)}; answers need "
                    f"exactly one output argument"
                )
        open_queries = [_shareable(q).variable_output() for q in queries]
        with self._bound(tables):
            results = self.model.solve(open_queries)
        out = []
        for q, result in zip(queries, results, strict=True):
            (i,) = q.output_ind
            # a query without answers comes back as itself, output still a variable, p = 0
            found = {key.args[i]: p for key, p in result.result.items()}
            out.append({answer: p for answer, p in found.items() if answer.is_ground()})
        return out

    def answer_probs(
        self,
        queries: Sequence[Query],
        domain: Sequence[Any],
        tables: Mapping[str, ProbabilityTable],
    ) -> QueryProbs:
        """The distribution over each query's output argument, as a (Q, A) matrix.

        Args:
            queries: queries with one output argument (see :meth:`answers`).
            domain: the A possible answers as Python values (ints for sums); column a is
                ``domain[a]``.
            tables: network name -> probability table.

        Returns:
            ``QueryProbs(probs (Q, A), provable (Q,))``; a row is all zero when no answer is
            provable.

        Raises:
            DataError: a provable answer is not in ``domain``.
        """
        column = {value: a for a, value in enumerate(domain)}
        rows, provable, like = [], [], None
        for q, dist in zip(queries, self.answers(queries, tables), strict=True):
            row: list[Any] = [0.0] * len(domain)
            for c, p in zip(answer_columns(q.query, dist, column), dist.values()):
                row[c] = p
                like = p if isinstance(p, torch.Tensor) else like
            rows.append(row)
            provable.append(len(dist) > 0)
        probs = [_scalars(row, like, self.device) for row in rows]  # Q x (A,)
        probs = torch.stack(probs) if probs else torch.zeros(0, len(domain), device=self.device)
        return QueryProbs(probs, torch.tensor(provable, dtype=torch.bool, device=self.device))

    def best_answers(
        self, queries: Sequence[Query], tables: Mapping[str, ProbabilityTable]
    ) -> list[Term | None]:
        """The most probable output argument of each query (None where none is provable).

        Args:
            queries: queries with one output argument (see :meth:`answers`).
            tables: network name -> probability table.

        Returns:
            One answer term per query, comparable with ``query.output_values()[0]``.
        """
        best: list[Term | None] = []
        for dist in self.answers(queries, tables):
            best.append(max(dist, key=lambda a: _as_float(dist[a])) if dist else None)
        return best

    def referenced_keys(self, queries: Sequence[Query]) -> dict[str, list[Term]]:
        """The inputs each network is asked about by the queries, from their ground circuits.

        Args:
            queries: queries with their substitutions (grounded and compiled once, then cached).

        Returns:
            Network name -> distinct input terms (e.g. ``tensor(train(17))``), first-seen order;
            networks the queries never reach are absent.
        """
        keys: dict[str, dict[Term, None]] = {}
        for q in map(_shareable, queries):
            circuit = self.model.solver.cache.get(q)
            for network, inputs in circuit.extract_neural():
                key = term2list(inputs.apply_term(q.substitution), False)[0]
                keys.setdefault(str(network), {})[key] = None
        return {name: list(found) for name, found in keys.items()}
