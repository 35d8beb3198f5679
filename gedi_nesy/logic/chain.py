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
:class:`~gedi_nesy.logic.compiled.CompiledLogic` (2 x base x 2 = 40 small templates, compiled once)
and multiplies the 2 x 2 matrices for the whole minibatch at once. The distribution over all
sums comes from the same columns with the digit left open: a forward pass over (carry, partial
sum) with 2 x base^N states per query (20,000 at N = 4).

The chain is an assumption about the program, so the engine checks it when it is built: on a
few two-digit queries with fixed random tables, the chain must equal the program's own
``add/3`` (compiled number form) to 1e-9 in float64; otherwise it refuses the program. A query
that names one image in two columns is refused too (its columns would not be independent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from deepproblog.query import Query
from problog.logic import Constant, Term, list2term, term2list

from gedi_nesy.errors import DataError, ProgramError
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.program import ProbabilityTable, QueryProbs, answer_columns, query_term

__all__ = ["ColumnChainLogic", "chain_probs", "sum_distribution"]

CHECK_SUMS = (7, 109, 190)  # two-digit sums of the build-time check: no carry, both carries


def chain_probs(columns: torch.Tensor, last_carry: torch.Tensor) -> torch.Tensor:
    """``e_0^T M_0 ... M_{N-1} e_c`` for a batch of carry chains.

    Args:
        columns: ``M_j[c, c']`` per query and column, least significant first, (Q, N, 2, 2).
        last_carry: the carry out of the last column each query needs, (Q,), int in {0, 1}.

    Returns:
        The chain probabilities, (Q,).
    """
    state = columns[:, 0, 0, :]  # (Q, 2): carry 0 into the first column
    for j in range(1, columns.shape[1]):
        state = torch.einsum("qc,qcd->qd", state, columns[:, j])  # (Q, 2)
    return state.gather(1, last_carry.view(-1, 1)).squeeze(1)  # (Q,)


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
        ProgramError: the program's ``predicate/3`` is not the carry chain of ``column/5``.
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
        if check:
            self.check_against_program()

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

    def _columns(
        self,
        parsed: Sequence[tuple[list[Term], list[Term], Any]],
        cells: Sequence[Sequence[Sequence[tuple[int, int, int]]]],
        tables: Mapping[str, ProbabilityTable],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P and provability of ``column(A_j, B_j, c, d, c')`` for every query, column and cell.

        Args:
            parsed: per query (As, Bs, S) from :meth:`_parse`, digits least significant first.
            cells: ``cells[q][j]``: the cells (c, d, c') asked of column j of query q.
            tables: network name -> probability table.

        Returns:
            (probs, provable), each flat in (query, column, cell) order.
        """
        probs, provable = self.logic.query_probs(self._cell_terms(parsed, cells), tables)
        return probs, provable.to(probs.device)

    def _cell_terms(
        self,
        parsed: Sequence[tuple[list[Term], list[Term], Any]],
        cells: Sequence[Sequence[Sequence[tuple[int, int, int]]]],
    ) -> list[Term]:
        """The terms ``column(A_j, B_j, c, d, c')``, flat in (query, column, cell) order."""
        return [
            Term(self.column, a[j], b[j], Constant(c), Constant(d), Constant(e))
            for (a, b, _), asked in zip(parsed, cells)
            for j, column in enumerate(asked)
            for c, d, e in column
        ]

    def _every_cell(self) -> list[tuple[int, int, int]]:
        """Every cell (carry in, digit, carry out) of a column."""
        return [(c, d, e) for c in (0, 1) for d in range(self.base) for e in (0, 1)]

    def query_probs(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> QueryProbs:
        """Probability of each ground ``add(As, Bs, S)``, differentiable w.r.t. the tables.

        Queries of one call must have the same number of digits N. A sum outside
        ``0 .. 2 * base^N - 1`` is unprovable (probability 0, ``provable = False``), as in the
        program.

        Returns:
            ``QueryProbs(probs (Q,), provable (Q,))``.
        """
        parsed = [self._parse(q, open_output=False) for q in queries]
        n = self._digits(parsed)
        if not parsed:
            return QueryProbs(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        base = self.base
        cells = [
            [[(c, s // base**j % base, e) for c in (0, 1) for e in (0, 1)] for j in range(n)]
            for _, _, s in parsed
        ]  # per query and column j: the 4 cells (c, d_j, c'), d_j read off S
        probs, provable = self._columns(parsed, cells, tables)
        matrices = probs.view(len(parsed), n, 2, 2)  # (Q, N, c, c')
        known = provable.view(len(parsed), n, 2, 2).to(probs.dtype)
        last = torch.tensor([s // base**n for _, _, s in parsed], device=probs.device)  # (Q,)
        in_range = torch.tensor([0 <= s < 2 * base**n for _, _, s in parsed],
                                device=probs.device)  # fmt: skip
        last = last.clamp(0, 1)
        p = chain_probs(matrices, last) * in_range.to(probs.dtype)  # (Q,)
        proof = (chain_probs(known, last) > 0) & in_range  # (Q,): some carry path fully provable
        return QueryProbs(p, proof.cpu())

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
        n = self._digits(parsed)
        probs, provable = self._columns(parsed, [[self._every_cell()] * n] * len(parsed), tables)
        shape = (len(parsed), n, 2, self.base, 2)
        dist = sum_distribution(probs.view(shape))
        proof = sum_distribution(provable.to(probs.dtype).view(shape)) > 0
        return dist, proof

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
        dist, proof = self._distributions(queries, tables)
        column = {value: a for a, value in enumerate(domain)}
        out = dist.new_zeros(len(queries), len(domain))
        for q, query in enumerate(queries):
            sums = proof[q].nonzero().flatten().tolist()
            term = query_term(query)
            cols = answer_columns(term, [Constant(s) for s in sums], column)
            out[q, cols] = dist[q, sums]
        return QueryProbs(out, proof.any(1).cpu())

    def best_answers(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> list[Term | None]:
        """The most probable sum of each query (the smallest on a tie; None if none provable)."""
        if not queries:
            return []
        dist, proof = self._distributions(queries, tables)
        masked = torch.where(proof, dist, torch.full_like(dist, -1.0))
        best = masked.argmax(1).tolist()  # first maximum: the smallest sum
        return [Constant(s) if bool(proof[q].any()) else None for q, s in enumerate(best)]

    def referenced_keys(self, queries: Sequence[Query | Term]) -> dict[str, list[Term]]:
        """The inputs each network is asked about: those the column circuits of every cell of
        every column of the queries read.

        Args:
            queries: ``add(As, Bs, S)`` queries (S given or open; any mix of N).

        Returns:
            Network name -> distinct input terms, first-seen order (least significant column
            first); networks the queries never reach are absent.
        """
        parsed = [self._parse(q, open_output=True) for q in queries]
        cells = [[self._every_cell()] * len(a) for a, _, _ in parsed]
        return self.logic.referenced_keys(self._cell_terms(parsed, cells))

    def check_against_program(self) -> None:
        """The chain equals the program's own ``add/3`` on two-digit queries, or ProgramError."""
        names = sorted(self.logic.networks)
        if len(names) != 1:
            raise ProgramError(
                f"{self.source}: logic.engine: column_chain needs one digit network, the program "
                f"declares {names}; use logic.engine: compiled"
            )
        name, k = names[0], self.logic.networks[names[0]]
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
            raise ProgramError(
                f"{self.source}: logic.engine: column_chain cannot evaluate "
                f"{self.predicate}/3 as a chain of {self.column}/5 ({exc}); use logic.engine: "
                "compiled"
            ) from None
        if not torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12):
            raise ProgramError(
                f"{self.source}: {self.predicate}/3 is not the carry chain of {self.column}/5: on "
                f"sums {list(CHECK_SUMS)} the program gives {theirs.tolist()}, the chain "
                f"{ours.tolist()}; use logic.engine: compiled"
            )
