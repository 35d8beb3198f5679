"""Compiled exact inference: DeepProbLog's circuits as flat, batched tensor programs.

DeepProbLog walks each query's SDD in Python, one scalar torch op per circuit node.
:class:`CompiledLogic` instead reduces each query to its template
(:mod:`gedi_nesy.logic.template`), compiles every template once into a
:class:`~gedi_nesy.logic.circuit.Circuit` of plain index arrays (:mod:`gedi_nesy.logic.circuit`),
keeps it in memory and on disk (:class:`~gedi_nesy.logic.template.CircuitCache`), and evaluates
all queries of a call, whatever their templates, in one batched pass over the circuits' levels
(:mod:`gedi_nesy.logic.batch`); one ``backward`` then reaches the tables.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from problog.logic import Term

from gedi_nesy.errors import DataError
from gedi_nesy.logic.batch import Group, Layout, build_program, circuit_layout, run_program
from gedi_nesy.logic.circuit import compile_circuit
from gedi_nesy.logic.params import PARAMETER_NETWORK, ProbabilityParameters, keep_random_state
from gedi_nesy.logic.program import (
    ProbabilityTable,
    QueryProbs,
    answer_columns,
    check_program,
    program_text,
    query_term,
)
from gedi_nesy.logic.template import (
    CircuitCache,
    default_cache_dir,
    fill_slots,
    has_slot,
    query_template,
    template_key,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # deepproblog.engines: "PySwip could not be found"
    from deepproblog.engines import ExactEngine
    from deepproblog.model import Model
    from deepproblog.network import Network
    from deepproblog.query import Query
    from deepproblog.solver import Solver

__all__ = ["CompiledLogic"]


def _instance_query(query: Query | Term, open_output: bool) -> tuple[Query, int]:
    """The query to evaluate (its output argument a variable if ``open_output``), output index."""
    q = query if isinstance(query, Query) else Query(query)
    if not open_output:
        return q, -1
    if len(q.output_ind) != 1:
        raise DataError(
            f"query {q.query} has output indices {tuple(q.output_ind)}; answers need exactly one "
            f"output argument"
        )
    return q.variable_output(), q.output_ind[0]


class CompiledLogic:
    """A ProbLog program with lookup neural predicates, solved by compiled exact inference.

    A drop-in for :class:`gedi_nesy.logic.dpl.LogicModel` (same methods, same results to rounding):
    each query template is compiled once (see the module docstring), kept in memory and in a
    :class:`CircuitCache` on disk, and every call evaluates all its queries, whatever their
    templates, in one batched pass with autograd to the tables.

    Args:
        program: a ``pathlib.Path`` to a .pl file, or the program text as a ``str``.
        networks: network name -> number of outputs K; checked by
            :func:`gedi_nesy.logic.program.check_program`.
        device: where the logic runs; None: where the tables are.
        cache_dir: folder of compiled circuits; None: :func:`default_cache_dir`.
        sdd_auto_gc: let the SDD library minimise circuits while compiling (smaller circuits;
            the probabilities do not depend on it).

    Attributes:
        parameters: the program's ``t(...)`` learnable probabilities
            (:class:`~gedi_nesy.logic.params.ProbabilityParameters`), read by every evaluation
            with autograd; None when it has none.
        stats: template look-ups answered from memory (``memory_hits``), from disk
            (``disk_hits``), and templates compiled (``compiled``).
    """

    def __init__(
        self,
        program: str | os.PathLike[str],
        networks: Mapping[str, int],
        *,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        sdd_auto_gc: bool = True,
    ) -> None:
        self.text, self.source = program_text(program)
        self.declarations = check_program(self.text, networks, self.source)
        self.networks = dict(networks)
        self.parameters = ProbabilityParameters.from_program(self.text, self.source)
        self.device = None if device is None else torch.device(device)
        self.sdd_auto_gc = sdd_auto_gc
        folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
        self.cache = CircuitCache(folder, self.text, sdd_auto_gc=sdd_auto_gc)
        self.stats = {"memory_hits": 0, "disk_hits": 0, "compiled": 0}
        n_parameters = 0 if self.parameters is None else len(self.parameters)
        # network i of the batch programs; the t(...) pseudo-network last
        self._names = sorted(self.networks) + ([PARAMETER_NETWORK] if n_parameters else [])
        self._k = {**self.networks, PARAMETER_NETWORK: n_parameters}
        self._groups = max(2, 1 + len(self._names))  # node groups per level, see circuit_layout
        self._layouts: dict[str, Layout] = {}  # template text -> layout
        self._by_key: dict[Any, Layout] = {}  # template_key -> layout
        self._solver: Solver | None = None

    def _grounding_solver(self) -> Solver:
        """DeepProbLog's exact engine over the program, built on the first cache miss.

        As in :class:`gedi_nesy.logic.dpl.LogicModel`, DeepProbLog's tensor builtins are not
        registered (``add/3`` stays free for programs). Its ``t(...)`` values are never read
        (the circuit records ``t(i)`` as a leaf), and building it leaves Python's random state
        as it was.
        """
        if self._solver is None:
            lookups = [Network(torch.nn.Identity(), name) for name in sorted(self.networks)]
            with keep_random_state():
                model = Model(self.text, lookups, load=False)
            self._solver = model.solver = Solver(model, ExactEngine(model), cache=False)
        return self._solver

    def layout(self, template: Term) -> Layout:
        """The compiled circuit of a template: from memory, from disk, or compiled and stored.

        Args:
            template: a query with placeholders, from :func:`query_template`.

        Returns:
            The circuit with its batching layout.
        """
        text = str(template)
        found = self._layouts.get(text)
        if found is not None:
            return found
        circuit = self.cache.load(text)
        if circuit is not None:
            self.stats["disk_hits"] += 1
        else:
            solver = self._grounding_solver()
            circuit = compile_circuit(solver, template, sdd_auto_gc=self.sdd_auto_gc)
            self.cache.store(circuit)
            self.stats["compiled"] += 1
        index = {name: i for i, name in enumerate(self._names)}
        found = self._layouts[text] = circuit_layout(circuit, index, self._groups)
        return found

    def _instance(self, query: Query | Term, open_output: bool) -> tuple[Layout, list[Term], int]:
        """(layout, slot terms, output index) of one query; the template is built on a miss."""
        q, output = _instance_query(query, open_output)
        slots: dict[Term, int] = {}
        key = template_key(q.query, q.substitution, slots)
        layout = self._by_key.get(key)
        if layout is None:
            template, _ = query_template(q.substitute().query)
            layout = self._by_key[key] = self.layout(template)
        else:
            self.stats["memory_hits"] += 1
        return layout, list(slots), output

    def prepare(self, queries: Sequence[Query | Term], *, answers: bool = False) -> int:
        """Compile (or load) the templates of some queries ahead of time.

        Args:
            queries: queries as for :meth:`query_probs`, or for :meth:`answers` if ``answers``.
            answers: prepare the open (all-answers) form of the queries.

        Returns:
            The number of distinct templates.
        """
        return len({id(self._instance(q, answers)[0]) for q in queries})

    def _check_tables(self, tables: Mapping[str, ProbabilityTable]) -> None:
        for name, table in tables.items():
            if name not in self.networks:
                raise DataError(
                    f"got a probability table for '{name}', but the registered networks are "
                    f"{self._names}; key tables by network name"
                )
            if table.probs.shape[1] != self.networks[name]:
                raise DataError(
                    f"the table of '{name}' has {table.probs.shape[1]} columns, the network has "
                    f"K = {self.networks[name]}; give one column per element of its nn/4 domain"
                )

    @staticmethod
    def _rows(
        layout: Layout, slots: Sequence[Term], tables: Mapping[str, ProbabilityTable]
    ) -> list[int]:
        """The table row of each neural atom of one query."""
        rows = []
        for name, slot, key in layout.atoms:
            if name == PARAMETER_NETWORK:
                rows.append(0)  # the parameters' one row
                continue
            if slot >= 0:
                key = slots[slot]
            elif has_slot(key):
                key = fill_slots(key, slots)
            table = tables.get(name)
            if table is None:
                raise DataError(
                    f"a query needs network '{name}' for {key}, but no probability table was "
                    f"given for it; pass tables={{'{name}': ProbabilityTable(...)}}"
                )
            row = table.index.get(key)
            if row is None:
                raise DataError(
                    f"the probability table of network '{name}' has no row for {key} "
                    f"({len(table.keys)} keys); forward every input the queries refer to"
                )
            rows.append(row)
        return rows

    def _table_tensors(
        self, tables: Mapping[str, ProbabilityTable]
    ) -> tuple[torch.device, torch.dtype, list[torch.Tensor | None]]:
        """(device, dtype, per network its (n, K) probabilities there, None if not given)."""
        given = [tables[name].probs for name in self._names if name in tables]
        device = self.device or (given[0].device if given else torch.device("cpu"))
        dtype = given[0].dtype if given else torch.get_default_dtype()
        for p in given:
            dtype = torch.promote_types(dtype, p.dtype)
        probs = [
            tables[name].probs.to(device=device, dtype=dtype) if name in tables else None
            for name in self._names
        ]  # (n, K) each, autograd intact
        if self.parameters is not None:
            probs[-1] = self.parameters.table(dtype, device)  # (1, P), in the tables' dtype
        return device, dtype, probs

    def _evaluate(
        self,
        instances: Sequence[tuple[Layout, list[Term], int]],
        tables: Mapping[str, ProbabilityTable],
    ) -> tuple[torch.Tensor, np.ndarray]:
        """All outputs of all instances in one pass.

        Returns:
            (values (n_outputs,), per instance the start of its outputs in ``values``; instance i
            owns ``len(layout.circuit.outputs)`` of them).
        """
        self._check_tables(tables)
        sizes = np.array([len(lay.circuit.outputs) for lay, _, _ in instances], dtype=np.int64)
        offsets = np.cumsum(sizes) - sizes
        members: dict[int, list[int]] = {}
        for i, (lay, _, _) in enumerate(instances):
            members.setdefault(id(lay), []).append(i)
        groups = []
        for idx in members.values():
            lay = instances[idx[0]][0]
            rows = [self._rows(lay, instances[i][1], tables) for i in idx]
            rows_array = np.array(rows, dtype=np.int64).reshape(len(idx), len(lay.atoms))
            groups.append(Group(lay, rows_array, offsets[idx]))
        device, dtype, probs = self._table_tensors(tables)
        if int(sizes.sum()) == 0:
            return torch.zeros(0, device=device, dtype=dtype), offsets
        k = [self._k[name] for name in self._names]
        program = build_program(groups, k, self._groups, int(sizes.sum()), device, dtype)
        return run_program(program, probs), offsets

    def query_probs(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> QueryProbs:
        """Probability of each ground query, differentiable w.r.t. the tables.

        Args:
            queries: ground queries (Query objects, their substitution applied here, or terms);
                any mix of templates.
            tables: network name -> probability table holding every input the queries need.

        Returns:
            ``QueryProbs(probs (Q,), provable (Q,))``: a query with no proof gets probability 0
            and ``provable = False`` (``n_unprovable`` counts them); the caller decides its loss.

        Raises:
            DataError: a query is not ground, or a table is missing, misshapen or lacks a row.
        """
        instances = [self._instance(q, open_output=False) for q in queries]
        for q, (lay, _, _) in zip(queries, instances):
            if not lay.ground:
                raise DataError(
                    f"query {query_term(q)} has free variables; query_probs needs ground "
                    f"queries, use answer_probs or best_answers for an output variable"
                )
        values, _ = self._evaluate(instances, tables)  # (Q,): one output per ground query
        provable = [lay.circuit.provable for lay, _, _ in instances]
        return QueryProbs(values, torch.tensor(provable, dtype=torch.bool))

    def _answers(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> tuple[torch.Tensor, np.ndarray, list[list[Term]]]:
        """(values, offsets) of the open queries, as :meth:`_evaluate`, and their answer terms."""
        instances = [self._instance(q, open_output=True) for q in queries]
        values, offsets = self._evaluate(instances, tables)
        answers = []
        for lay, slots, i in instances:
            found = [name.args[i] for name in lay.output_terms]
            answers.append([fill_slots(a, slots) if has_slot(a) else a for a in found])
        return values, offsets, answers

    def answers(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> list[dict[Term, torch.Tensor]]:
        """The distribution over each query's output argument (``Query.output_ind``, one index).

        Args:
            queries: queries whose output argument is replaced by a variable (its given value
                is ignored); a plain term's output argument is its last.
            tables: network name -> probability table, as for :meth:`query_probs`.

        Returns:
            Per query, answer term -> probability (a 0-d tensor), in DeepProbLog's order; an
            empty dict when no answer is provable.
        """
        values, offsets, answers = self._answers(queries, tables)
        return [
            {answer: values[o + a] for a, answer in enumerate(found)}
            for o, found in zip(offsets, answers)
        ]

    def answer_probs(
        self,
        queries: Sequence[Query | Term],
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
        values, offsets, answers = self._answers(queries, tables)
        targets = np.zeros(len(values), dtype=np.int64)  # flat (query, column) of each output
        for q, (o, found) in enumerate(zip(offsets, answers)):
            columns = answer_columns(query_term(queries[q]), found, column)
            targets[o : o + len(found)] = q * len(domain) + np.asarray(columns, dtype=np.int64)
        flat = values.new_zeros(len(queries) * len(domain))  # (Q * A,)
        flat = flat.index_copy(0, torch.from_numpy(targets).to(values.device), values)
        provable = torch.tensor([len(found) > 0 for found in answers], dtype=torch.bool)
        return QueryProbs(flat.view(len(queries), len(domain)), provable)  # (Q, A), (Q,)

    def best_answers(
        self, queries: Sequence[Query | Term], tables: Mapping[str, ProbabilityTable]
    ) -> list[Term | None]:
        """The most probable output argument of each query (None where none is provable).

        Args:
            queries: queries with one output argument (see :meth:`answers`).
            tables: network name -> probability table.

        Returns:
            One answer term per query, comparable with ``query.output_values()[0]``; a tie goes
            to the first answer in DeepProbLog's order.
        """
        values, offsets, answers = self._answers(queries, tables)
        host = values.detach().cpu().numpy()
        return [
            found[int(np.argmax(host[o : o + len(found)]))] if found else None
            for o, found in zip(offsets, answers)
        ]

    def referenced_keys(self, queries: Sequence[Query | Term]) -> dict[str, list[Term]]:
        """The inputs each network is asked about by the queries, from their compiled circuits.

        Args:
            queries: queries as for :meth:`query_probs`.

        Returns:
            Network name -> distinct input terms (e.g. ``tensor(train(17))``), first-seen order;
            networks the queries never reach are absent.
        """
        keys: dict[str, dict[Term, None]] = {}
        for query in queries:
            lay, slots, _ = self._instance(query, open_output=False)
            for name, slot, key in lay.atoms:
                if name == PARAMETER_NETWORK:
                    continue
                key = slots[slot] if slot >= 0 else fill_slots(key, slots)
                keys.setdefault(name, {})[key] = None
        return {name: list(found) for name, found in keys.items()}
