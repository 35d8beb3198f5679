"""Exact N-digit addition as a chain of compiled columns (``logic.engine: column_chain``).

The number form of ``add(As, Bs, S)`` (``programs/multi_addition.pl``) compiles one circuit per
distinct sum: at N = 4 that is up to 19,999 templates of 3-5 s each. But the program's proof of
``add`` is a carry chain: column j (least significant first) adds digit images ``A_j``, ``B_j``
and the carry ``c_j`` in {0, 1}, writes the sum's digit ``d_j`` and passes carry ``c_{j+1}``, with
``c_0 = 0`` and the last carry equal to ``S // base^N``. The columns use disjoint images, so they
are independent, and a digit assignment fixes the carry path, so the paths are disjoint events:

    P(add(As, Bs, S)) = e_0^T  M_0 M_1 ... M_{N-1}  e_{S // base^N},
    M_j[c, c'] = P(column(A_j, B_j, c, d_j, c')),

exactly. :class:`ColumnChainLogic` evaluates the program's own ``column/5`` with
:class:`~gedi_nesy.logic.compiled.CompiledLogic` once, as bilinear forms of the two images'
tables (:mod:`gedi_nesy.logic.columns`), so a minibatch is a gather and one matrix product,
and multiplies the 2 x 2 matrices for the whole minibatch at once, rescaled per column
(:func:`chain_log_probs`, in log space, for chains whose probability is below the dtype's
range; the trainer takes its loss from :meth:`ColumnChainLogic.query_log_probs`). The
distribution over all sums comes from the same columns with the digit left open: a forward pass
over (carry, partial sum) with 2 x base^N states per query (20,000 at N = 4), so
``answer_probs`` is for small N only; the most probable sum (``best_answers``) never builds it
(:func:`~gedi_nesy.logic.best_sum.best_sums`, exact for any N).

The chain is an assumption about the program, so the engine checks it when it is built: on a
few two-digit queries with fixed random tables, the chain must equal the program's own
``add/3`` (compiled number form) to 1e-9 in float64; otherwise it refuses the program. A query
that names one image in two columns is refused too (its columns would not be independent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from deepproblog.query import Query
from problog.logic import Constant, Term, list2term, term2list

from gedi_nesy.errors import DataError, ProgramError
from gedi_nesy.logic.best_sum import best_sums
from gedi_nesy.logic.columns import (
    build_column_tensors,
    column_cells,
    column_keys,
    column_provable,
)
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.program import (
    ProbabilityTable,
    QueryLogProbs,
    QueryProbs,
    answer_columns,
    query_term,
)

__all__ = ["ColumnChainLogic", "chain_log_probs", "chain_probs", "reachable", "sum_distribution"]

CHECK_SUMS = (7, 109, 190)  # two-digit sums of the build-time check: no carry, both carries
LOG_ZERO = -1e30  # log 0 of chain_log_probs: N of them stay finite in float32 (N < 1e8), and any
# path through one stays below LOG_ZERO / 2, far from every log-probability a chain can have


def _scaled_chain(
    columns: torch.Tensor, last_carry: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain with its carry state rescaled by a power of two after every column.

    The state after column j is divided by ``2^e_j``, the power of two at or below its largest
    entry (1 where the state is all zero), so it never drifts towards float under- or overflow
    however long the chain; dividing by a power of two is exact, and the scales are constants
    (``detach``): the chain is linear in its state, so values and gradients are the unscaled
    chain's, times ``2^E``.

    Returns:
        (the scaled chain value (Q,), the exponent ``E = sum_j e_j`` (Q,), int), so that
        ``P = value * 2^E``.
    """
    state = columns[:, 0, 0, :]  # (Q, 2): carry 0 into the first column
    exponent = torch.zeros(state.shape[0], dtype=torch.int64, device=state.device)  # (Q,)
    for j in range(1, columns.shape[1]):
        _, e = torch.frexp(state.detach().amax(1))  # (Q,): largest = m * 2^e, m in [0.5, 1)
        e = e.to(torch.int64) - 1  # (Q,): 2^e <= largest < 2^(e+1); 0 -> 2^-1, still exact
        state = torch.ldexp(state, -e.unsqueeze(1).to(state.dtype))  # (Q, 2): max in [1, 2)
        exponent = exponent + e
        state = torch.einsum("qc,qcd->qd", state, columns[:, j])  # (Q, 2): e^T M_0 ... M_j
    return state.gather(1, last_carry.view(-1, 1)).squeeze(1), exponent  # (Q,), (Q,)


def reachable(proofs: torch.Tensor, last_carry: torch.Tensor) -> torch.Tensor:
    """Whether a carry path from carry 0 to ``last_carry`` has a nonzero cell in every column.

    Args:
        proofs: ``M_j[c, c']`` per query and column, non-negative (1 where provable), (Q, N, 2, 2).
        last_carry: the carry out of the last column, (Q,), int in {0, 1}.

    Returns:
        (Q,) bool; exact for any N (the state is kept 0 or 1, never a count that could overflow
        or fall out of range).
    """
    state = proofs[:, 0, 0, :] > 0  # (Q, 2): carries reachable after column 0
    for j in range(1, proofs.shape[1]):
        step = torch.einsum("qc,qcd->qd", state.to(proofs.dtype), proofs[:, j])  # (Q, 2)
        state = step > 0  # (Q, 2)
    return state.gather(1, last_carry.view(-1, 1)).squeeze(1)  # (Q,)


def chain_probs(columns: torch.Tensor, last_carry: torch.Tensor) -> torch.Tensor:
    """``e_0^T M_0 ... M_{N-1} e_c`` for a batch of carry chains.

    The carry state is rescaled after every column (:func:`_scaled_chain`), so a long chain
    underflows only when its probability itself is below the dtype's range; use
    :func:`chain_log_probs` then.

    Args:
        columns: ``M_j[c, c']`` per query and column, least significant first, (Q, N, 2, 2).
        last_carry: the carry out of the last column each query needs, (Q,), int in {0, 1}.

    Returns:
        The chain probabilities, (Q,).
    """
    value, exponent = _scaled_chain(columns, last_carry)  # (Q,), (Q,)
    return torch.ldexp(value, exponent.to(value.dtype))  # (Q,)


def chain_log_probs(columns: torch.Tensor, last_carry: torch.Tensor) -> torch.Tensor:
    """``log(e_0^T M_0 ... M_{N-1} e_c)`` in log space, finite for chains whose probability is
    far below the dtype's range (N = 100+ digits in float32); ``-inf`` where the probability is 0
    (with a zero gradient there, not NaN).

    Each carry keeps its own log-value: ``l_{j}[c'] = logsumexp_c (l_{j-1}[c] + log M_j[c, c'])``,
    so one carry's value far below the other's (a carry path that dies out) is not lost, as it
    is under the shared scale of :func:`chain_probs`. A zero entry of M is ``LOG_ZERO``, a
    finite stand-in for ``log 0`` that keeps every gradient finite.

    Args:
        columns: as for :func:`chain_probs`, (Q, N, 2, 2).
        last_carry: as for :func:`chain_probs`, (Q,).

    Returns:
        The chain log-probabilities, (Q,).
    """
    positive = columns > 0  # (Q, N, 2, 2)
    logs = torch.where(positive, columns, torch.ones_like(columns)).log()  # (Q, N, 2, 2)
    logs = torch.where(positive, logs, torch.full_like(logs, LOG_ZERO))  # log M_j[c, c']
    state = logs[:, 0, 0, :]  # (Q, 2): log e_0^T M_0
    for j in range(1, columns.shape[1]):
        state = torch.logsumexp(state.unsqueeze(2) + logs[:, j], dim=1)  # (Q, 2): log v M_j
    out = state.gather(1, last_carry.view(-1, 1)).squeeze(1)  # (Q,)
    return torch.where(out > LOG_ZERO / 2, out, torch.full_like(out, -math.inf))  # (Q,)


def sum_distribution(cells: torch.Tensor) -> torch.Tensor:
    """The distribution over sums from open columns.

    Args:
        cells: ``T_j[c, d, c'] = P(column(A_j, B_j, c, d, c'))`` per query and column, least
            significant first, shape (Q, N, 2, base, 2).

    Returns:
        ``P(S = s)`` for s in ``0 .. 2 * base^N - 1``, shape (Q, 2 * base^N); entry ``s`` sums the
        carry paths that write s's digits and end in carry ``s // base^N``.
    """
    q, n, _, base, _ = cells.shape
    state = cells[:, 0, 0].transpose(1, 2)  # (Q, 2 carries out, base digits)
    for j in range(1, n):
        step = torch.einsum("qcs,qcde->qeds", state, cells[:, j])  # (Q, 2, base, base^j)
        state = step.reshape(q, 2, base ** (j + 1))  # index d * base^j + s
    return state.reshape(q, 2 * base**n)  # index carry * base^N + s


class ColumnChainLogic:
    """N-digit addition programs solved exactly as chains of compiled ``column/5`` circuits.

    A drop-in for :class:`~gedi_nesy.logic.compiled.CompiledLogic` on ``add(As, Bs, S)`` queries
    (the :class:`~gedi_nesy.logic.engine.LogicEngine` methods); see the module docstring.

    Args:
        logic: the compiled engine over the program; it evaluates the columns.
        predicate: the addition predicate, ``predicate(As, Bs, S)`` with As, Bs lists of digit
            inputs, most significant first.
        column: the column predicate, ``column(A, B, Cin, D, Cout)``.
        base: the digit base (the columns' D ranges over ``0 .. base - 1``).
        check: compare the chain with the program's own ``predicate/3`` when built.

    Raises:
        ProgramError: the program's ``predicate/3`` is not the carry chain of ``column/5``, or
            it has ``t(...)`` learnable probabilities.
    """

    def __init__(
        self,
        logic: CompiledLogic,
        *,
        predicate: str = "add",
        column: str = "column",
        base: int = 10,
        check: bool = True,
    ) -> None:
        self.logic, self.predicate, self.column, self.base = logic, predicate, column, base
        self.source, self.networks = logic.source, logic.networks
        names = sorted(logic.networks)
        if len(names) != 1:
            raise ProgramError(
                f"{self.source}: logic.engine: column_chain needs one digit network, the program "
                f"declares {names}; use logic.engine: compiled"
            )
        if logic.parameters is not None:
            raise ProgramError(
                f"{self.source}: logic.engine: column_chain evaluates fixed column tensors and "
                f"cannot train the program's t(...) probabilities {logic.parameters.names}; use "
                f"logic.engine: compiled"
            )
        self.parameters = None  # the chain never trains t(...) probabilities
        self.network = names[0]
        try:
            self.tensors = build_column_tensors(logic, self.network, column, base)
        except DataError as exc:
            raise self._cannot(exc) from None
        if check:
            self.check_against_program()

    def _cannot(self, exc: Exception) -> ProgramError:
        return ProgramError(
            f"{self.source}: logic.engine: column_chain cannot evaluate {self.predicate}/3 as a "
            f"chain of {self.column}/5 ({exc}); use logic.engine: compiled"
        )

    def _parse(
        self, query: Query | Term, *, open_output: bool
    ) -> tuple[list[Term], list[Term], Any]:
        """(As least significant first, Bs likewise, the sum as an int or None if open)."""
        term = query_term(query)
        if term.functor != self.predicate or term.arity != 3:
            raise DataError(
                f"query {term} is not {self.predicate}(As, Bs, S); logic.engine: column_chain "
                f"solves N-digit addition only, use logic.engine: compiled for other queries"
            )
        try:
            a, b = term2list(term.args[0], False), term2list(term.args[1], False)
        except ValueError:  # not a fixed list
            a = b = []
        if not a or len(a) != len(b):
            raise DataError(
                f"query {term}: As and Bs must be non-empty lists of the same length (digits, "
                f"most significant first)"
            )
        seen: dict[Term, int] = {}
        for j, column in enumerate(zip(a[::-1], b[::-1])):
            for image in set(column):
                if seen.setdefault(image, j) != j:
                    raise DataError(
                        f"query {term} uses {image} in two columns; the chain needs each image "
                        "in one column only (independent columns), use logic.engine: compiled"
                    )
        s = term.args[2]
        if open_output:
            return a[::-1], b[::-1], None
        if not (isinstance(s, Constant) and isinstance(s.value, int)):
            raise DataError(
                f"query {term} has sum {s}; query_probs needs an integer sum, use answer_probs "
                f"or best_answers for an open one"
            )
        return a[::-1], b[::-1], int(s.value)

    def _table(
        self, tables: Mapping[str, ProbabilityTable]
    ) -> tuple[ProbabilityTable, torch.Tensor]:
        """(the digit network's table, its (n, K) probabilities where the logic runs)."""
        self.logic._check_tables(tables)
        table = tables.get(self.network)
        if table is None:
            raise DataError(
                f"the queries need network '{self.network}', but no probability table was given "
                f"for it; pass tables={{'{self.network}': ProbabilityTable(...)}}"
            )
        return table, table.probs.to(device=self.logic.device or table.probs.device)

    def _cells(
        self,
        parsed: Sequence[tuple[list[Term], list[Term], Any]],
        tables: Mapping[str, ProbabilityTable],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P and provability (0 or 1) of ``column(A_j, B_j, c, d, c')`` for every query,
        column and cell, (Q, N, 2, base, 2) each, on the logic's device.

        Args:
            parsed: per query (As, Bs, S) from :meth:`_parse`, digits least significant first.
            tables: network name -> probability table.
        """
        table, probs = self._table(tables)
        rows = [[self._row(table, key) for key in a + b] for a, b, _ in parsed]
        index = torch.tensor(rows, dtype=torch.int64).view(len(parsed), 2, -1)  # (Q, 2, N)
        rows_a, rows_b = index[:, 0].to(probs.device), index[:, 1].to(probs.device)  # (Q, N)
        shape = (len(parsed), rows_a.shape[1], 2, self.base, 2)
        cells = column_cells(self.tensors, probs, rows_a, rows_b).view(shape)
        known = column_provable(self.tensors, rows_a == rows_b, probs.dtype).view(shape)
        return cells, known

    def _row(self, table: ProbabilityTable, key: Term) -> int:
        row = table.index.get(key)
        if row is None:
            raise DataError(
                f"the probability table of network '{self.network}' has no row for {key} "
                f"({len(table.keys)} keys); forward every input the queries refer to"
            )
        return row

    def _chain_inputs(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The chain of every ground query: ``M_j`` at the sum's digits (Q, N, 2, 2), which of
        their cells are provable (Q, N, 2, 2), the last carry (Q,) and whether the sum is in
        ``0 .. 2 * base^N - 1`` (Q,); None for no queries."""
        parsed = [self._parse(q, open_output=False) for q in queries]
        n = self._digits(parsed)
        if not parsed:
            return None
        cells, known = self._cells(parsed, tables)  # (Q, N, 2, base, 2) each
        base, device = self.base, cells.device
        digits = torch.tensor(
            [[s // base**j % base for j in range(n)] for _, _, s in parsed], device=device
        )  # (Q, N): d_j read off S
        at = digits.view(len(parsed), n, 1, 1, 1).expand(-1, -1, 2, 1, 2)  # (Q, N, 2, 1, 2)
        matrices = cells.gather(3, at).squeeze(3)  # (Q, N, c, c'): M_j[c, c'] at d_j
        proofs = known.gather(3, at).squeeze(3)  # (Q, N, c, c'): 1 where the cell is provable
        last = torch.tensor([min(max(s // base**n, 0), 1) for _, _, s in parsed], device=device)
        in_range = torch.tensor([0 <= s < 2 * base**n for _, _, s in parsed], device=device)
        return matrices, proofs, last, in_range

    @staticmethod
    def _provable(proofs: torch.Tensor, last: torch.Tensor, in_range: torch.Tensor) -> torch.Tensor:
        """Whether some carry path is provable in every column, (Q,) on the CPU."""
        return (reachable(proofs, last) & in_range).cpu()  # (Q,)

    def query_probs(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> QueryProbs:
        """Probability of each ground ``add(As, Bs, S)``, differentiable w.r.t. the tables.

        Queries of one call must have the same number of digits N. A sum outside
        ``0 .. 2 * base^N - 1`` is unprovable (probability 0, ``provable = False``), as in the
        program. A long chain's probability may be below the dtype's range (0); use
        :meth:`query_log_probs` then.

        Returns:
            ``QueryProbs(probs (Q,), provable (Q,))``.
        """
        inputs = self._chain_inputs(queries, tables)
        if inputs is None:
            return QueryProbs(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        matrices, proofs, last, in_range = inputs  # (Q, N, 2, 2) x 2, (Q,), (Q,)
        p = chain_probs(matrices, last) * in_range.to(matrices.dtype)  # (Q,)
        return QueryProbs(p, self._provable(proofs, last, in_range))

    def query_log_probs(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> QueryLogProbs:
        """``log P`` of each ground ``add(As, Bs, S)``, finite however long the chain (unless
        P is 0: ``-inf``, with a zero gradient), differentiable w.r.t. the tables.

        Returns:
            ``QueryLogProbs(log_probs (Q,), provable (Q,))``; as :meth:`query_probs` otherwise.
        """
        inputs = self._chain_inputs(queries, tables)
        if inputs is None:
            return QueryLogProbs(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        matrices, proofs, last, in_range = inputs  # (Q, N, 2, 2) x 2, (Q,), (Q,)
        logs = chain_log_probs(matrices, last)  # (Q,)
        logs = torch.where(in_range, logs, torch.full_like(logs, -math.inf))  # (Q,)
        return QueryLogProbs(logs, self._provable(proofs, last, in_range))

    def _digits(self, parsed: Sequence[tuple[list, list, Any]]) -> int:
        sizes = {len(a) for a, _, _ in parsed}
        if len(sizes) > 1:
            raise DataError(
                f"queries with {sorted(sizes)} digits in one call; logic.engine: column_chain "
                f"evaluates one N at a time, split the batch by N"
            )
        return sizes.pop() if sizes else 0

    def _distributions(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P(S = s) and whether s is provable, (Q, 2 * base^N) each."""
        parsed = [self._parse(q, open_output=True) for q in queries]
        self._digits(parsed)
        cells, known = self._cells(parsed, tables)  # (Q, N, 2, base, 2) each
        return sum_distribution(cells), sum_distribution(known) > 0  # (Q, 2 * base^N) each

    def answer_probs(
        self,
        queries: Sequence[Query | Term],
        domain: Sequence[Any],
        tables: Mapping[str, ProbabilityTable],
    ) -> QueryProbs:
        """The distribution over each query's sum, as a (Q, A) matrix (column a is ``domain[a]``).

        Raises:
            DataError: a provable sum is not in ``domain``.
        """
        if not queries:
            return QueryProbs(torch.zeros(0, len(domain)), torch.zeros(0, dtype=torch.bool))
        dist, proof = self._distributions(queries, tables)  # (Q, S) each
        column = {value: a for a, value in enumerate(domain)}
        target = torch.tensor([column.get(s, -1) for s in range(dist.shape[1])],
                              device=dist.device)  # fmt: skip  # (S,): domain column of sum s
        outside = proof & (target < 0)  # (Q, S): provable sums missing from the domain
        if bool(outside.any()):
            q = int(outside.any(1).nonzero()[0])
            sums = [Constant(s) for s in outside[q].nonzero().flatten().tolist()]
            answer_columns(query_term(queries[q]), sums, column)  # raises the DataError
        inside = target >= 0  # (S,)
        out = dist.new_zeros(len(queries), len(domain))  # (Q, A)
        kept = torch.where(proof, dist, torch.zeros_like(dist))[:, inside]  # (Q, S in domain)
        out[:, target[inside]] = kept
        return QueryProbs(out, proof.any(1).cpu())

    def best_answers(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> list[Term | None]:
        """The most probable sum of each query, exact for any N (:func:`best_sums`: prefixes
        pruned to the upper-right hull, never the 2 * base^N sums); where every sum has
        probability 0, a provable sum (None if none is)."""
        if not queries:
            return []
        parsed = [self._parse(q, open_output=True) for q in queries]
        self._digits(parsed)
        cells, known = self._cells(parsed, tables)  # (Q, N, 2, base, 2) each
        best = best_sums(cells)
        answers: list[Term | None] = [Constant(s) for s in best.sums]
        zero = torch.isinf(best.log_probs).nonzero().flatten().tolist()  # P = 0 for every sum
        if zero:
            proved = best_sums(known[zero])  # the sum with the most provable carry paths
            for q, s, lp in zip(zero, proved.sums, proved.log_probs.tolist()):
                answers[q] = Constant(s) if lp > -math.inf else None
        return answers

    def referenced_keys(self, queries: Sequence[Query | Term]) -> dict[str, list[Term]]:
        """The inputs each network is asked about: those the column circuits of every cell of
        every column of the queries read.

        Args:
            queries: ``add(As, Bs, S)`` queries (S given or open; any mix of N).

        Returns:
            Network name -> distinct input terms, first-seen order (least significant column
            first); networks the queries never reach are absent.
        """
        keys: dict[Term, None] = {}
        for a, b, _ in (self._parse(q, open_output=True) for q in queries):
            keys.update(dict.fromkeys(column_keys(self.tensors, list(zip(a, b)))))
        return {self.network: list(keys)} if keys else {}

    def check_against_program(self) -> None:
        """The chain equals the program's own ``add/3`` on two-digit queries, or ProgramError."""
        name, k = self.network, self.logic.networks[self.network]
        keys = [Term("tensor", Term("gedi_check", Constant(i))) for i in range(4)]
        gen = torch.Generator().manual_seed(0)
        probs = torch.softmax(torch.randn(4, k, generator=gen, dtype=torch.float64), -1)  # (4, K)
        tables = {name: ProbabilityTable(keys, probs)}
        queries = [
            Term(self.predicate, list2term(keys[:2]), list2term(keys[2:]), Constant(s))
            for s in CHECK_SUMS
        ]
        try:
            ours = self.query_probs(queries, tables).probs
            theirs = self.logic.query_probs(queries, tables).probs
        except (DataError, ProgramError) as exc:
            raise self._cannot(exc) from None
        if not torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12):
            raise ProgramError(
                f"{self.source}: {self.predicate}/3 is not the carry chain of {self.column}/5: on "
                f"sums {list(CHECK_SUMS)} the program gives {theirs.tolist()}, the chain "
                f"{ours.tolist()}; use logic.engine: compiled"
            )
