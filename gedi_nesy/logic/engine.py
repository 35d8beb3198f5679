"""The contract every logic engine keeps, and the one place that builds an engine from a config.

An engine holds a ProbLog program with neural predicates and answers questions about queries
given one :class:`~gedi_nesy.logic.program.ProbabilityTable` per network (rows of ``p(y | x)`` for
the inputs the queries name). Three engines keep the contract:

- :class:`~gedi_nesy.logic.compiled.CompiledLogic` (``logic.engine: compiled``, the default): one
  circuit per query template, a whole minibatch in one batched pass;
- :class:`~gedi_nesy.logic.dpl.LogicModel` (``deepproblog``): DeepProbLog's own per-query solve;
- :class:`~gedi_nesy.logic.chain.ColumnChainLogic` (``column_chain``): N-digit addition as an
  exact chain of compiled column circuits.

The trainer, the audit and the relabelling see an engine only through :class:`LogicEngine`, so a
fourth engine needs nothing else. An engine that can also give log-probabilities directly (the
column chain, whose long chains fall below float range) keeps :class:`LogProbEngine` too, and the
trainer then takes its logic loss in log space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gedi_nesy.logic.chain import ColumnChainLogic
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.logic.program import ProbabilityTable, QueryLogProbs, QueryProbs

if TYPE_CHECKING:
    from deepproblog.query import Query
    from problog.logic import Term

    from gedi_nesy.config import LogicConfig

__all__ = ["LogProbEngine", "LogicEngine", "build_logic"]


@runtime_checkable
class LogicEngine(Protocol):
    """Exact inference over a program whose neural predicates read probability tables.

    Attributes:
        source: the program's file name (or ``<program>``), for messages.
        networks: network name -> K, the size of its nn/4 domain (column j of its table is the
            j-th domain value).

    An engine may also have ``parameters``: the program's ``t(...)`` learnable probabilities
    (:class:`~gedi_nesy.logic.params.ProbabilityParameters`, or None), read by every query with
    autograd; the trainer optimises them when it is there. The three engines here have it.
    """

    source: str
    networks: dict[str, int]

    def query_probs(
        self, queries: Sequence[Query], tables: Mapping[str, ProbabilityTable]
    ) -> QueryProbs:
        """P(query) of ground queries, (Q,), differentiable w.r.t. the tables; ``provable``
        (Q,) says which have a proof (an unprovable query gets 0, never a silent loss)."""
        ...

    def answer_probs(
        self,
        queries: Sequence[Query],
        domain: Sequence[Any],
        tables: Mapping[str, ProbabilityTable],
    ) -> QueryProbs:
        """The distribution over each query's output argument, (Q, A) over ``domain``."""
        ...

    def best_answers(
        self, queries: Sequence[Query], tables: Mapping[str, ProbabilityTable]
    ) -> list[Term | None]:
        """The most probable output argument of each query (None where none is provable)."""
        ...

    def referenced_keys(self, queries: Sequence[Query]) -> dict[str, list[Term]]:
        """Network name -> the distinct input terms the queries ask it about."""
        ...


@runtime_checkable
class LogProbEngine(LogicEngine, Protocol):
    """An engine that also gives ``log P(query)`` directly, finite where P is below the dtype's
    range (long chains); the trainer takes the logic loss from it when an engine has it
    (:class:`~gedi_nesy.logic.chain.ColumnChainLogic` does)."""

    def query_log_probs(
        self, queries: Sequence[Query], tables: Mapping[str, ProbabilityTable]
    ) -> QueryLogProbs:
        """log P(query) of ground queries, (Q,), differentiable w.r.t. the tables; ``-inf``
        where P is 0; ``provable`` (Q,) as in :meth:`LogicEngine.query_probs`."""
        ...


def build_logic(cfg: LogicConfig, program: str | Path, networks: Mapping[str, int]) -> LogicEngine:
    """The engine ``cfg.engine`` names, over ``program`` and its networks.

    Args:
        cfg: the ``logic`` section of a run config.
        program: a ``pathlib.Path`` to a .pl file, or the program text.
        networks: network name -> K; checked against the program's nn/4 statements.

    Returns:
        A :class:`~gedi_nesy.logic.compiled.CompiledLogic`,
        :class:`~gedi_nesy.logic.dpl.LogicModel` or
        :class:`~gedi_nesy.logic.chain.ColumnChainLogic`.

    Raises:
        ProgramError: the program does not parse or does not match the networks.
    """
    if cfg.engine == "deepproblog":
        return LogicModel(program, networks, sdd_auto_gc=cfg.sdd_auto_gc)
    compiled = CompiledLogic(
        program, networks, cache_dir=cfg.cache_dir, sdd_auto_gc=cfg.sdd_auto_gc
    )
    return ColumnChainLogic(compiled) if cfg.engine == "column_chain" else compiled
