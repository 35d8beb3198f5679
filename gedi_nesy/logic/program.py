"""A ProbLog program's neural predicates: nn/4 parsing and checks, probability tables, queries.

For ``nn(Net, [X], Y, [d_0, ..., d_{K-1}]) :: p(X, Y).``, column j of a network's
:class:`ProbabilityTable` is ``P(p(X, d_j))``: the j-th element of the domain list. Every engine
(:mod:`gedi_nesy.logic.engine`) takes its tables in this form and returns :class:`QueryProbs`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from deepproblog.query import Query
from problog.errors import ParseError, ProbLogError
from problog.logic import Clause, Constant, Or, Term, Var, is_list, term2list
from problog.program import PrologString

from gedi_nesy.errors import DataError, ProgramError

__all__ = [
    "LearnableFact",
    "NeuralDeclaration",
    "ProbabilityTable",
    "QueryLogProbs",
    "argmax_tables",
    "QueryProbs",
    "answer_columns",
    "check_program",
    "learnable_facts",
    "parse_neural_declarations",
    "program_text",
    "query_term",
    "subterms",
    "tensor_keys",
    "term_value",
]


@dataclass(frozen=True)
class NeuralDeclaration:
    """One ``nn(Net, [X], Y, Domain) :: p(...)`` statement of a program.

    Attributes:
        network: network name (the first argument of nn/4).
        predicate: name of the neural predicate (``digit`` in ``digit(X, Y)``).
        arity: arity of the neural predicate.
        domain: the domain list as Python values (int / float for numbers, str otherwise);
            column j of the network's output is ``domain[j]``.
        line: line of the statement in the program text (1-based).
    """

    network: str
    predicate: str
    arity: int
    domain: list[Any]
    line: int


def term_value(term: Term) -> Any:
    """A ground ProbLog term as a Python value: ``3`` -> 3, ``1.5`` -> 1.5, ``a`` / ``"a"`` -> "a".

    Args:
        term: a ground term (a number, an atom or string, or a compound term).

    Returns:
        int or float for numbers; the name, without quotes, for atoms and strings; ``str(term)``
        for compound terms.
    """
    if isinstance(term, Constant) and isinstance(term.functor, (int, float)):
        return term.functor
    text = str(term)
    if term.arity == 0 and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _statements(program_text: str, source: str) -> Iterator[tuple[Any, int]]:
    """Each parsed statement with its line; a parse error becomes a one-line ProgramError."""
    program = PrologString(program_text)
    try:
        for statement in program:
            location = getattr(statement, "location", None)
            position = program.lineno(location[1]) if location else None
            yield statement, (position[1] if position else 0)
    except ParseError as error:
        line, column = error.location[1:] if isinstance(error.location, tuple) else ("?", "?")
        raise ProgramError(
            f"{source}:{line}:{column}: {error.base_message}; fix the ProbLog syntax there"
        ) from None


def _annotated_heads(statement: Any) -> list[Term]:
    """The heads that can carry a probability annotation in one statement."""
    if isinstance(statement, Clause):
        return [statement.head]
    if isinstance(statement, Or):
        return list(statement.to_list())
    return [statement] if isinstance(statement, Term) else []


def _declaration(head: Term, in_disjunction: bool, source: str, line: int) -> NeuralDeclaration:
    """Check the form of one nn-annotated head and describe it."""
    nn = head.probability
    where = f"{source}:{line}: {nn}::{head.with_probability(None)}"
    if nn.arity != 4:
        raise ProgramError(
            f"{where} is nn/{nn.arity}; gedi_nesy serves nn/4 only, written "
            f"nn(Net, [X], Y, [d0, ..., dK]) :: p(X, Y)"
        )
    if in_disjunction:
        raise ProgramError(f"{where} sits in a ';' disjunction; write each nn/4 as its own fact")
    network, inputs, _, domain = nn.args
    if not is_list(inputs) or len(term2list(inputs, False)) != 1:
        raise ProgramError(
            f"{where} has inputs {inputs}; a lookup table serves one input per nn/4, "
            f"write nn({network}, [X], Y, Domain)"
        )
    if not is_list(domain) or not domain.is_ground():
        raise ProgramError(f"{where} has domain {domain}; write a ground list such as [0, 1, 2]")
    return NeuralDeclaration(
        network=str(network),
        predicate=str(head.functor),
        arity=head.arity,
        domain=[term_value(d) for d in term2list(domain, False)],
        line=line,
    )


def parse_neural_declarations(
    program_text: str, source: str = "<program>"
) -> list[NeuralDeclaration]:
    """Parse a ProbLog program and list its neural predicates.

    Args:
        program_text: the program.
        source: file name used in error messages.

    Returns:
        One :class:`NeuralDeclaration` per nn/4 statement, in program order.

    Raises:
        ProgramError: the program does not parse (the message gives file, line and column), or an
            nn annotation is not of the form ``nn(Net, [X], Y, [d0, ..., dK]) :: p(...)``.
    """
    declarations = []
    for statement, line in _statements(program_text, source):
        heads = _annotated_heads(statement)
        for head in heads:
            p = head.probability
            if isinstance(p, Term) and p.functor == "nn":
                in_disjunction = isinstance(statement, Or)
                declarations.append(_declaration(head, in_disjunction, source, line))
    return declarations


@dataclass(frozen=True)
class LearnableFact:
    """One ``t(...)`` learnable probability, numbered as DeepProbLog 2.1 numbers it.

    DeepProbLog's ``Model._extract_parameters`` walks the statements in order and gives each
    ``t(...)`` of a fact, of a clause head and of a body-less annotated disjunction the next
    index (``Model.parameters[index]``); the t(...) entries of one disjunction form a group
    (``Model.parameter_groups``). :func:`learnable_facts` keeps that order, so index i here is
    the ``t(i)`` DeepProbLog's grounding puts in the circuits.

    Attributes:
        index: the parameter's index.
        initial: the starting value of ``t(p)`` (``p`` a number or a fraction such as ``1/4``, in
            [0, 1]); None for ``t(_)``, which DeepProbLog starts at ``random.random()``.
        group: index of its annotated disjunction, None for a fact or clause of its own.
        name: the annotated head as text, e.g. ``house_rank(jack)``.
        line: line of the statement in the program text (1-based).
    """

    index: int
    initial: float | None
    group: int | None
    name: str
    line: int


def _learnable_initial(head: Term, where: str) -> float | None:
    """The starting value of a ``t(...)`` head: a number in [0, 1], or None for ``t(_)``."""
    t = head.probability
    if t.arity != 1:
        raise ProgramError(f"{where} has t/{t.arity}; write t(p) with p in [0, 1], or t(_)")
    (value,) = t.args
    if isinstance(value, Var):
        return None
    try:
        p = float(value)
    except (ProbLogError, TypeError, ValueError):
        p = None
    if p is None or not 0.0 <= p <= 1.0:
        raise ProgramError(
            f"{where} starts at {value}; write t(p) with p a number in [0, 1] (e.g. 0.1 or 1/4), "
            f"or t(_) for a random start"
        )
    return p


def _is_learnable(head: Term) -> bool:
    p = head.probability
    return isinstance(p, Term) and p.functor == "t"


def _statement_facts(statement: Any, line: int, source: str, first: int, group: int) -> list[Any]:
    """The learnable facts of one statement, as DeepProbLog's ``_extract_parameters`` sees it."""
    if type(statement) is Term:
        heads = [statement]
    elif type(statement) is Clause:
        heads = [statement.head]
    elif type(statement) is Or:
        heads = list(statement.to_list())
    else:
        if any(_is_learnable(h) for h in getattr(statement, "heads", None) or []):
            raise ProgramError(
                f"{source}:{line}: {statement} is an annotated disjunction with a body and t(...) "
                f"entries, which DeepProbLog 2.1 does not number (it would read the wrong "
                f"parameter); write the disjunction as a fact without a body, "
                f"t(p)::a; t(q)::b., and use it in a rule"
            )
        return []
    learnable = [h for h in heads if _is_learnable(h)]
    in_group = type(statement) is Or and bool(learnable)
    if in_group and len(learnable) != len(heads):
        raise ProgramError(
            f"{source}:{line}: the annotated disjunction {statement} mixes t(...) and fixed "
            f"probabilities; DeepProbLog normalises the t(...) entries to sum 1 on their own, so "
            f"make every entry t(...) or none"
        )
    facts = []
    for i, head in enumerate(learnable):
        name = str(head.with_probability(None))
        where = f"{source}:{line}: {head.probability}::{name}"
        group_index = group if in_group else None
        facts.append(LearnableFact(first + i, _learnable_initial(head, where), group_index, name,
                                   line))  # fmt: skip
    return facts


def learnable_facts(program_text: str, source: str = "<program>") -> list[LearnableFact]:
    """The program's ``t(...)`` learnable probabilities, in DeepProbLog's parameter order.

    Args:
        program_text: the program.
        source: file name used in error messages.

    Returns:
        One :class:`LearnableFact` per ``t(...)``; empty when the program has none.

    Raises:
        ProgramError: a ``t(...)`` that cannot be trained: not ``t(p)`` with p in [0, 1] or
            ``t(_)``; in an annotated disjunction that also has fixed probabilities; in an
            annotated disjunction with a body (``t(p)::a(X); t(q)::b(X) :- c(X).``).
    """
    facts: list[LearnableFact] = []
    groups = 0
    for statement, line in _statements(program_text, source):
        found = _statement_facts(statement, line, source, len(facts), groups)
        groups += any(f.group is not None for f in found)
        facts.extend(found)
    return facts


def check_program(
    program_text: str, networks: Mapping[str, int], source: str = "<program>"
) -> list[NeuralDeclaration]:
    """Check that a program's nn/4 statements match the registered networks.

    Args:
        program_text: the program.
        networks: registered network name -> its number of outputs K.
        source: file name used in error messages.

    Returns:
        The program's neural declarations, in program order.

    Raises:
        ProgramError: the program does not parse; an nn/4 names a network that is not
            registered; a registered network is used by no nn/4; a domain's size differs from
            the network's K; a ``t(...)`` learnable probability cannot be trained (see
            :func:`learnable_facts`).
    """
    declarations = parse_neural_declarations(program_text, source)
    registered = sorted(networks)
    for d in declarations:
        if d.network not in networks:
            raise ProgramError(
                f"{source}:{d.line}: nn/4 for {d.predicate}/{d.arity} uses network "
                f"'{d.network}', which is not registered; registered: {registered}. "
                f"Register it or rename the network in the program"
            )
        k = networks[d.network]
        if len(d.domain) != k:
            raise ProgramError(
                f"{source}:{d.line}: network '{d.network}' has K = {k} outputs but the domain "
                f"of {d.predicate}/{d.arity} has {len(d.domain)} values {d.domain}; make them equal"
            )
    used = {d.network for d in declarations}
    for name in registered:
        if name not in used:
            raise ProgramError(
                f"{source}: network '{name}' is registered but no nn/4 uses it; the program's "
                f"networks are {sorted(used)}. Unregister it or add an nn({name}, [X], Y, [...]) "
                f":: p(X, Y) statement"
            )
    learnable_facts(program_text, source)  # a t(...) that cannot be trained is an error here
    return declarations


@dataclass(frozen=True)
class ProbabilityTable:
    """Rows of ``p(y|x)`` for a set of inputs, keyed by their tensor terms.

    Attributes:
        keys: one term per row, e.g. ``tensor(train(17))``; distinct.
        probs: shape (n, K); row i is the distribution of ``keys[i]`` over the nn/4 domain.
    """

    keys: Sequence[Term]
    probs: torch.Tensor
    index: dict[Term, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.probs.dim() != 2 or self.probs.shape[0] != len(self.keys):
            raise DataError(
                f"ProbabilityTable got {len(self.keys)} keys and probs of shape "
                f"{tuple(self.probs.shape)}; probs must be (n_keys, K), one row per key"
            )
        index = {key: i for i, key in enumerate(self.keys)}
        if len(index) != len(self.keys):
            raise DataError(
                f"ProbabilityTable got {len(self.keys)} keys but only {len(index)} distinct; "
                f"give each input once"
            )
        object.__setattr__(self, "index", index)


def argmax_tables(tables: Mapping[str, ProbabilityTable]) -> dict[str, ProbabilityTable]:
    """Each table with its rows made one-hot at their most probable value (the first on a tie):
    a deterministic program then answers what the argmax concepts imply.

    Args:
        tables: network name -> table, probs (n, K).

    Returns:
        Network name -> a table with the same keys and one-hot rows (n, K), same dtype and device.
    """
    return {
        name: ProbabilityTable(
            table.keys,
            F.one_hot(table.probs.argmax(-1), table.probs.shape[-1]).to(table.probs.dtype),
        )  # (n, K)
        for name, table in tables.items()
    }


class QueryProbs(NamedTuple):
    """Probabilities of a batch of queries.

    Attributes:
        probs: P(query), shape (Q,) (or (Q, A) over an answer domain); 0 where unprovable.
        provable: whether each query has at least one proof, shape (Q,), bool.
    """

    probs: torch.Tensor
    provable: torch.Tensor

    @property
    def n_unprovable(self) -> int:
        return int((~self.provable).sum())


class QueryLogProbs(NamedTuple):
    """Log-probabilities of a batch of queries, for chains whose probability is below the
    dtype's range.

    Attributes:
        log_probs: log P(query), shape (Q,); ``-inf`` where P is 0 (unprovable queries included).
        provable: whether each query has at least one proof, shape (Q,), bool.
    """

    log_probs: torch.Tensor
    provable: torch.Tensor


def program_text(program: str | os.PathLike[str]) -> tuple[str, str]:
    """(text, source name) of a program given as a path (``Path``, or a one-line ``str`` ending in
    ``.pl``) or as the program text itself."""
    single_line = isinstance(program, str) and "\n" not in program.strip()
    if isinstance(program, os.PathLike) or (single_line and program.strip().endswith(".pl")):
        path = Path(program).expanduser()
        if not path.is_file():
            raise ProgramError(f"program file {path} does not exist; give a path to a .pl file")
        return path.read_text(), str(path)
    return program, "<program>"


def answer_columns(query: Term, answers: Iterable[Term], column: Mapping[Any, int]) -> list[int]:
    """The answer-domain column of each answer term of ``query``.

    Args:
        query: the query the answers belong to (for the error message).
        answers: answer terms, e.g. sums as ``Constant`` terms.
        column: answer value (a Python value, see :func:`term_value`) -> column index.

    Raises:
        DataError: an answer is not in the domain.
    """
    columns = []
    for answer in answers:
        value = term_value(answer)
        if value not in column:
            raise DataError(
                f"query {query} has answer {value}, which is not in the answer domain "
                f"({len(column)} values); widen the domain"
            )
        columns.append(column[value])
    return columns


def subterms(term: Term) -> Iterator[Term]:
    """Every subterm of ``term``, itself included (depth first)."""
    stack = [term]
    while stack:
        t = stack.pop()
        yield t
        stack.extend(t.args)


def query_term(query: Query | Term) -> Term:
    """The query term, its substitution applied."""
    return query.substitute().query if isinstance(query, Query) else query


def tensor_keys(queries: Sequence[Query]) -> list[Term]:
    """The distinct ``tensor(...)`` terms the (substituted) queries use, in first-seen order."""
    seen: dict[Term, None] = {}
    for q in queries:
        stack = [q.substitute().query]
        while stack:
            term = stack.pop()
            if term.functor == "tensor" and term.arity == 1:
                seen.setdefault(term, None)
            else:
                stack.extend(reversed(term.args))
    return list(seen)
