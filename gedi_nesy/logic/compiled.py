"""Compiled exact inference: DeepProbLog's circuits as flat, batched tensor programs.

DeepProbLog walks each query's SDD in Python, one scalar torch op per circuit node. Here a query
is first reduced to its *template*: its tensor arguments (subterms ``tensor(...)``) are replaced,
in order of first appearance, by placeholders ``tensor(gedi_slot(i))``, so
``addition(tensor(train(3)), tensor(train(8)), 11)`` becomes
``addition(tensor(gedi_slot(0)), tensor(gedi_slot(1)), 11)``; one input named twice gets one slot.
Each template is grounded and compiled ONCE, by DeepProbLog's own exact engine (``nn/4`` turned
into annotated disjunctions) and ProbLog's SDD compiler, and the arithmetic of DeepProbLog's
``ArithmeticCircuit.evaluate`` is *recorded* rather than computed: ProbLog's SDD evaluator runs
with :class:`_Recorder`, a semiring that mirrors ``GraphSemiring`` (AD weights, smoothing,
normalisation by the weight of the constraints) but returns node ids. The recorded DAG is
rewritten into sum-of-binary-product nodes ``c + sum_t coef_t * x_a(t) * x_b(t)`` (a sum or a
product with one consumer is merged into it), levelled, and stored as plain index arrays, on disk
too (:class:`CircuitCache`).

At run time all queries of a minibatch, whatever their templates, are evaluated in one pass over
the levels: level 0 gathers the neural probabilities from the (n, K) tables, each further level is
two gathers, a product and a scatter-add over every query's nodes at once; one ``backward`` then
reaches the tables.

Numerics: plain probabilities in the tables' dtype, as DeepProbLog computes them (log space
cannot hold the AD complements ``1 - sum p``, which DeepProbLog evaluates and which may round to
slightly below 0). A product of 2N table entries underflows float32 only below ~1e-38, that is
where -log p > 87; DeepProbLog underflows at the same point.
Differences from stock DeepProbLog: ``x * 0.0`` with a plain-float zero is dropped (as
:class:`gedi_nesy.logic.dpl.ExactZeroSemiring` does; the same values and gradients for finite
inputs), and sums and products are re-associated, so results agree to rounding (~1e-16
relative in float64). On CUDA the scatter-add sums in no fixed order (last-bit differences).
Not supported, as in :func:`gedi_nesy.logic.program.check_program`: ``t(...)`` learnable
probabilities, ``nn/3`` / ``nn/2``, networks with several inputs, DeepProbLog's tensor builtins.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from problog.errors import ProbLogError
from problog.evaluator import Semiring
from problog.formula import LogicDAG, LogicFormula
from problog.logic import Constant, Term, term2list
from problog.sdd_formula import SDD

from gedi_nesy.errors import DataError, ProgramError
from gedi_nesy.logic.program import (
    ProbabilityTable,
    QueryProbs,
    answer_columns,
    check_program,
    program_text,
    query_term,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # deepproblog.engines: "PySwip could not be found"
    from deepproblog.engines import ExactEngine
    from deepproblog.model import Model
    from deepproblog.network import Network
    from deepproblog.query import Query
    from deepproblog.solver import Solver

__all__ = [
    "FORMAT_VERSION",
    "Circuit",
    "CircuitCache",
    "CompiledLogic",
    "compile_circuit",
    "default_cache_dir",
    "query_template",
]

FORMAT_VERSION = 1  # bump when the stored arrays change meaning
SLOT = "gedi_slot"
SOP, DIV = 0, 1  # op kinds: sum of binary products, division (the normaliser of a query)


# --------------------------------------------------------------------------- templates


def _slot(i: int) -> Term:
    return Term("tensor", Term(SLOT, Constant(i)))


def query_template(term: Term) -> tuple[Term, list[Term]]:
    """Replace the tensor arguments of a query by placeholders.

    Args:
        term: a query term, e.g. ``addition(tensor(train(3)), tensor(train(8)), 11)``.

    Returns:
        (template, slots): the term with each distinct ``tensor(...)`` subterm replaced by
        ``tensor(gedi_slot(i))``, i in order of first appearance (depth first, left to right),
        and the replaced subterms, ``slots[i]`` for placeholder i.
    """
    slots: dict[Term, Term] = {}

    def visit(t: Term) -> Term:
        if t.functor == "tensor" and t.arity == 1:
            if t not in slots:
                slots[t] = _slot(len(slots))
            return slots[t]
        if not t.args:
            return t
        return t.with_args(*[visit(a) for a in t.args])

    template = visit(term)
    return template, list(slots)


def _template_key(term: Term, substitution: Mapping[Term, Term], slots: dict[Term, int]) -> Any:
    """A hashable structural key of a query's template (cheaper than building the template).

    Args:
        term: the query term before ``substitution`` is applied.
        substitution: a Query's substitution (placeholder term -> value), possibly empty.
        slots: filled with tensor term -> placeholder index, in order of first appearance.

    Returns:
        Nested tuples equal for two queries iff their templates are equal terms.
    """
    if substitution and term in substitution:
        return _template_key(substitution[term], {}, slots)  # values are not substituted again
    if term.functor == "tensor" and term.arity == 1:
        return (SLOT, slots.setdefault(term, len(slots)))
    if not term.args:
        return (type(term), type(term.functor), term.functor)
    return (term.functor, *[_template_key(a, substitution, slots) for a in term.args])


def _slot_index(term: Term) -> int | None:
    """i for a placeholder ``tensor(gedi_slot(i))``, else None."""
    if term.functor == "tensor" and term.arity == 1:
        inner = term.args[0]
        if inner.functor == SLOT and inner.arity == 1:
            return int(inner.args[0])
    return None


def _has_slot(term: Term) -> bool:
    stack = [term]
    while stack:
        t = stack.pop()
        if _slot_index(t) is not None:
            return True
        stack.extend(t.args)
    return False


def _fill_slots(term: Term, slots: Sequence[Term]) -> Term:
    """The template term with placeholder i replaced by ``slots[i]``."""
    i = _slot_index(term)
    if i is not None:
        return slots[i]
    if not term.args:
        return term
    return term.with_args(*[_fill_slots(a, slots) for a in term.args])


# --------------------------------------------------------------------------- recording semiring


class _Ref:
    """A recorded circuit node, as a value flowing through ProbLog's evaluator."""

    __slots__ = ("id",)

    def __init__(self, node_id: int) -> None:
        self.id = node_id

    def __repr__(self) -> str:
        return f"_Ref({self.id})"


def _exact(a: Any, value: float) -> bool:
    """Whether ``a`` is the plain float ``value`` (a node never is: it carries a gradient)."""
    return type(a) is float and a == value


class _Recorder(Semiring):
    """DeepProbLog's GraphSemiring arithmetic, recorded as a hash-consed DAG.

    Plain floats are folded exactly as GraphSemiring folds them (0 + x, 1 * x, float op float);
    ``x * 0.0`` is 0.0 as in :class:`gedi_nesy.logic.dpl.ExactZeroSemiring`. Everything else
    becomes a node ``("add" | "mul" | "div", a, b)``, ``("neg", a)`` (1 - a), ``("const", v)`` or
    ``("leaf", network, inputs, j)`` (column j of the network's output on ``inputs``).
    """

    eps = 1e-5  # GraphSemiring's tolerance for is_one / is_zero

    def __init__(self) -> None:
        self.nodes: list[tuple[Any, ...]] = []
        self._ids: dict[tuple[Any, ...], int] = {}

    def _node(self, *key: Any) -> _Ref:
        node_id = self._ids.get(key)
        if node_id is None:
            node_id = self._ids[key] = len(self.nodes)
            self.nodes.append(key)
        return _Ref(node_id)

    def _id(self, a: Any) -> int:
        return a.id if isinstance(a, _Ref) else self._node("const", float(a)).id

    def _binary(self, op: str, a: Any, b: Any, commutative: bool) -> _Ref:
        x, y = self._id(a), self._id(b)
        if commutative and y < x:
            x, y = y, x  # IEEE + and * are commutative: a + b == b + a exactly
        return self._node(op, x, y)

    def one(self) -> float:
        return 1.0

    def zero(self) -> float:
        return 0.0

    def is_one(self, a: Any) -> bool:
        return type(a) is float and 1.0 - self.eps <= a <= 1.0 + self.eps

    def is_zero(self, a: Any) -> bool:
        return type(a) is float and -self.eps <= a <= self.eps

    def is_dsp(self) -> bool:
        return True

    def plus(self, a: Any, b: Any) -> Any:
        if _exact(b, 0.0):
            return a
        if _exact(a, 0.0):
            return b
        if type(a) is float and type(b) is float:
            return a + b
        return self._binary("add", a, b, commutative=True)

    def times(self, a: Any, b: Any) -> Any:
        if _exact(a, 0.0) or _exact(b, 0.0):
            return 0.0
        if _exact(b, 1.0):
            return a
        if _exact(a, 1.0):
            return b
        if type(a) is float and type(b) is float:
            return a * b
        return self._binary("mul", a, b, commutative=True)

    def negate(self, a: Any) -> Any:
        if type(a) is float:
            return 1.0 - a
        return self._node("neg", a.id)

    def normalize(self, a: Any, z: Any) -> Any:
        if _exact(z, 1.0):
            return a
        if type(a) is float and type(z) is float:
            return a / z
        return self._binary("div", a, z, commutative=False)

    def value(self, a: Any, key: Any = None) -> Any:
        if type(a) is Constant:
            return float(a)
        if type(a) is float:
            return a
        if type(a) is Term and a.functor == "nn":
            j = int(a.args[2]) if len(a.args) == 3 else 0
            return self._node("leaf", str(a.args[0]), a.args[1], j)
        if type(a) is Term and a.functor in ("t", "tensor"):
            raise ProgramError(
                f"probability {a} is a {a.functor}(...) term; compiled inference serves fixed "
                f"probabilities and nn/4 only, use engine 'deepproblog' for this program"
            )
        if type(a) is Term and a.functor == "'/'":
            return float(a)
        return float(a.compute_value())


# --------------------------------------------------------------------------- circuits


@dataclass(frozen=True)
class Circuit:
    """One compiled query template: a levelled program over a node vector, as plain arrays.

    Node ids: ``[0, n_consts)`` constants (node 0 is 1.0), then leaves, then ops in topological
    order. Op o is ``op_const[o] + sum over terms t with term_op[t] == o of
    term_coef[t] * x[term_a[t]] * x[term_b[t]]`` (SOP) or ``x[term_a] / x[term_b]`` of its
    single term (DIV).

    Attributes:
        template: the template term as text (placeholders ``tensor(gedi_slot(i))``).
        consts: (n_consts,) float64 constant values.
        leaf_atom: (n_leaves,) neural atom of each leaf; leaf_class: (n_leaves,) its column j.
        atom_network: (n_atoms,) network name of each neural atom; atom_input: (n_atoms,) the
            atom's input term as text (a placeholder, or a term without tensor arguments).
        op_kind: (n_ops,) SOP or DIV; op_const: (n_ops,) float64; op_level: (n_ops,) level
            (1 + the highest level of its operands; constants and leaves are level 0).
        term_op, term_a, term_b: (n_terms,) op index and operand node ids; term_coef: float64.
        outputs: (n_outputs,) node id of each query answer; output_names: their ground atoms as
            text, in the order DeepProbLog's result lists them.
        provable: whether the template's query has a proof (the ground program is not FALSE).
    """

    template: str
    consts: np.ndarray
    leaf_atom: np.ndarray
    leaf_class: np.ndarray
    atom_network: np.ndarray
    atom_input: np.ndarray
    op_kind: np.ndarray
    op_const: np.ndarray
    op_level: np.ndarray
    term_op: np.ndarray
    term_a: np.ndarray
    term_b: np.ndarray
    term_coef: np.ndarray
    outputs: np.ndarray
    output_names: np.ndarray
    provable: bool

    @property
    def n_nodes(self) -> int:
        return len(self.consts) + len(self.leaf_atom) + len(self.op_kind)

    @property
    def n_levels(self) -> int:
        return 1 + int(self.op_level.max(initial=0))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The circuit as named numpy arrays (no Python objects), for ``np.savez``."""
        arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        arrays["template"] = np.array(self.template)
        arrays["provable"] = np.array(self.provable)
        arrays["format"] = np.array(FORMAT_VERSION)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Circuit:
        """Inverse of :meth:`to_arrays`; raises KeyError or ValueError on a foreign file."""
        if int(arrays["format"]) != FORMAT_VERSION:
            raise ValueError(f"format {int(arrays['format'])}, expected {FORMAT_VERSION}")
        fields = {name: np.asarray(arrays[name]) for name in _ARRAY_FIELDS}
        return cls(template=str(arrays["template"]), provable=bool(arrays["provable"]), **fields)


_ARRAY_FIELDS = (
    "consts", "leaf_atom", "leaf_class", "atom_network", "atom_input", "op_kind", "op_const",
    "op_level", "term_op", "term_a", "term_b", "term_coef", "outputs", "output_names",
)  # fmt: skip


def compile_circuit(solver: Solver, template: Term, *, sdd_auto_gc: bool = True) -> Circuit:
    """Ground, compile and record one query template (ProbLog + pysdd; seconds for big ones).

    Args:
        solver: a DeepProbLog solver with the exact engine over the program.
        template: the query term with placeholders (see :func:`query_template`); it may hold
            variables, whose answers all become outputs.
        sdd_auto_gc: let the SDD library minimise the circuit while compiling.

    Returns:
        The recorded circuit; its outputs follow DeepProbLog's result order, and a ground
        template whose query has no answer gets one constant-0 output.
    """
    recorder = _Recorder()
    try:
        ground = solver.engine.ground(Query(template), label=LogicFormula.LABEL_QUERY)
        proof = LogicDAG.create_from(ground, keep_named=True)  # as ArithmeticCircuit.__init__
        sdd = SDD.create_from(proof, sdd_auto_gc=sdd_auto_gc)
        result = sdd.evaluate(semiring=recorder)  # as ArithmeticCircuit.evaluate: name -> value
    except ProbLogError as error:
        raise ProgramError(
            f"compiling the query {template} failed: {error}; check that the program defines "
            f"the query's predicate for these arguments"
        ) from None
    provable = any(node is not None for _, node in proof.queries())
    if template.is_ground():
        names, values = [template], [result.get(template, 0.0)]
    else:
        names, values = list(result), list(result.values())
    outputs = [recorder._id(v) for v in values]
    return _flatten(recorder.nodes, outputs, names, str(template), provable)


# --------------------------------------------------------------------------- flattening


@dataclass
class _Builder:
    """Accumulates the sum-of-binary-product program of one circuit."""

    consts: dict[float, int] = field(default_factory=lambda: {1.0: 0})
    leaves: dict[tuple[str, Term, int], int] = field(default_factory=dict)
    ops: list[tuple[int, float, list[tuple[float, Any, Any]]]] = field(default_factory=list)

    def const(self, value: float) -> tuple[str, int]:
        return ("c", self.consts.setdefault(value, len(self.consts)))

    def leaf(self, key: tuple[str, Term, int]) -> tuple[str, int]:
        return ("l", self.leaves.setdefault(key, len(self.leaves)))

    def op(self, kind: int, const: float, terms: list[tuple[float, Any, Any]]) -> tuple[str, int]:
        self.ops.append((kind, const, terms))
        return ("o", len(self.ops) - 1)

    def product(self, factors: list[Any]) -> Any:
        """A node for the product of ``factors``, as a balanced tree of binary products."""
        if len(factors) == 1:
            return factors[0]
        half = len(factors) // 2
        return self.op(
            SOP, 0.0, [(1.0, self.product(factors[:half]), self.product(factors[half:]))]
        )

    def sop(self, const: float, terms: list[tuple[float, list[Any]]]) -> tuple[str, int]:
        """A node ``const + sum coef * prod(factors)``; products of > 2 factors are split."""
        binary = []
        for coef, factors in terms:
            if not factors:
                const += coef
            elif len(factors) == 1:
                binary.append((coef, factors[0], self.const(1.0)))
            else:
                half = len(factors) // 2
                binary.append((coef, self.product(factors[:half]), self.product(factors[half:])))
        return self.op(SOP, const, binary)


_Form = tuple[float, list[tuple[float, list[Any]]]]  # const + sum coef * prod(factors)


def _uses(nodes: list[tuple[Any, ...]], outputs: list[int]) -> tuple[list[int], list[str]]:
    """Per recorded node: how many reachable consumers it has, and the kind of the last one."""
    uses, consumer = [0] * len(nodes), [""] * len(nodes)
    reached = [False] * len(nodes)
    for o in outputs:
        reached[o] = True
        uses[o] += 2  # an output is materialised whatever its consumers
    for i in range(len(nodes) - 1, -1, -1):  # operands have smaller ids than their consumers
        op = nodes[i][0]
        if not reached[i] or op in ("const", "leaf"):
            continue
        for operand in nodes[i][1:]:
            reached[operand] = True
            uses[operand] += 1
            consumer[operand] = op
    return uses, consumer


def _flatten(
    nodes: list[tuple[Any, ...]], outputs: list[int], names: list[Term], template: str,
    provable: bool,
) -> Circuit:  # fmt: skip
    """Rewrite a recorded DAG into levelled sum-of-binary-product ops (see :class:`Circuit`)."""
    uses, consumer = _uses(nodes, outputs)
    build, node_of, forms = _Builder(), {}, {}
    for i, (op, *args) in enumerate(nodes):
        if uses[i] == 0:
            continue
        if op == "const":
            node_of[i] = build.const(args[0])
            continue
        if op == "leaf":
            node_of[i] = build.leaf(tuple(args))
            continue
        if op == "div":
            node_of[i] = build.op(DIV, 0.0, [(1.0, node_of[args[0]], node_of[args[1]])])
            continue
        form = _product_form(nodes, args, node_of, forms) if op == "mul" else None
        if op == "add":
            form = _add_forms(*(_sum_form(nodes, a, node_of, forms) for a in args))
        elif op == "neg":
            c, terms = _sum_form(nodes, args[0], node_of, forms)
            form = (1.0 - c, [(-coef, factors) for coef, factors in terms])
        inline = uses[i] == 1 and (
            consumer[i] in ("add", "neg") or (op, consumer[i]) == ("mul", "mul")
        )
        if inline:
            forms[i] = form
        else:
            node_of[i] = build.sop(*form)
    return _circuit_arrays(build, [node_of[o] for o in outputs], names, template, provable)


def _sum_form(nodes: list[tuple[Any, ...]], i: int, node_of: dict, forms: dict) -> _Form:
    """Node i as ``const + sum coef * prod(factors)``."""
    if nodes[i][0] == "const":
        return (nodes[i][1], [])
    if i in forms:
        return forms[i]
    return (0.0, [(1.0, [node_of[i]])])


def _add_forms(a: _Form, b: _Form) -> _Form:
    return (a[0] + b[0], a[1] + b[1])


def _product_form(
    nodes: list[tuple[Any, ...]], args: list[int], node_of: dict, forms: dict
) -> _Form:
    """A binary product, merging inlined products and folding constants into the coefficient."""
    coef, factors = 1.0, []
    for a in args:
        if nodes[a][0] == "const":
            coef *= nodes[a][1]
        elif a in forms:  # an inlined product: one term, no constant
            ((inner_coef, inner_factors),) = forms[a][1]
            coef *= inner_coef
            factors += inner_factors
        else:
            factors.append(node_of[a])
    return (0.0, [(coef, factors)])


def _circuit_arrays(
    build: _Builder, outputs: list[Any], names: list[Term], template: str, provable: bool
) -> Circuit:
    """Number the built nodes (constants, leaves, ops) and pack them into a :class:`Circuit`."""
    n_consts, n_leaves = len(build.consts), len(build.leaves)
    base = {"c": 0, "l": n_consts, "o": n_consts + n_leaves}

    def nid(ref: tuple[str, int]) -> int:
        return base[ref[0]] + ref[1]

    atoms: dict[tuple[str, Term], int] = {}
    leaf_atom, leaf_class = [], []
    for network, inputs, j in build.leaves:
        leaf_atom.append(atoms.setdefault((network, inputs), len(atoms)))
        leaf_class.append(j)
    terms = [(o, nid(a), nid(b), coef) for o, op in enumerate(build.ops) for coef, a, b in op[2]]
    term_op, term_a, term_b = (np.array([t[k] for t in terms], np.int64) for k in range(3))
    level = [0] * (n_consts + n_leaves) + [1] * len(build.ops)  # an op is at least level 1
    for o, a, b, _ in terms:  # ops are in topological order: operands are levelled first
        level[base["o"] + o] = max(level[base["o"] + o], 1 + level[a], 1 + level[b])
    return Circuit(
        template=template,
        consts=np.array(list(build.consts), dtype=np.float64),
        leaf_atom=np.array(leaf_atom, dtype=np.int64),
        leaf_class=np.array(leaf_class, dtype=np.int64),
        atom_network=np.array([n for n, _ in atoms], dtype=str),
        atom_input=np.array([str(_single_input(i)) for _, i in atoms], dtype=str),
        op_kind=np.array([k for k, _, _ in build.ops], dtype=np.int64),
        op_const=np.array([c for _, c, _ in build.ops], dtype=np.float64),
        op_level=np.array(level[base["o"] :], dtype=np.int64),
        term_op=term_op,
        term_a=term_a,
        term_b=term_b,
        term_coef=np.array([t[3] for t in terms], dtype=np.float64),
        outputs=np.array([nid(o) for o in outputs], dtype=np.int64),
        output_names=np.array([str(n) for n in names], dtype=str),
        provable=provable,
    )


def _single_input(inputs: Term) -> Term:
    """The one input of an nn/4 atom (``[X]`` -> X), the key of its table row."""
    return term2list(inputs, False)[0]


# --------------------------------------------------------------------------- disk cache


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/gedi_nesy/compiled``, else ``~/.cache/gedi_nesy/compiled``.

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        The folder (not created).
    """
    env = os.environ if environ is None else environ
    root = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "gedi_nesy" / "compiled"


class CircuitCache:
    """Compiled circuits on disk, one ``<sha256>.npz`` of plain arrays per template.

    The key hashes the program text, the template, the ProbLog / pysdd / DeepProbLog versions,
    the SDD option and :data:`FORMAT_VERSION`: an edited program or an upgrade misses. Files are
    written to a temporary file in the same folder and renamed (``os.replace``), so processes can
    share the folder; an unreadable or partial file counts as a miss and is rewritten.

    Args:
        folder: where the files live (created on the first write).
        program_text: the program the circuits belong to.
        sdd_auto_gc: the SDD option the circuits are compiled with.
    """

    def __init__(self, folder: Path, program_text: str, *, sdd_auto_gc: bool) -> None:
        self.folder = Path(folder)
        self._salt = {
            "format": FORMAT_VERSION,
            "program": program_text,
            "sdd_auto_gc": sdd_auto_gc,
            "versions": {p: version(p) for p in ("problog", "pysdd", "deepproblog")},
        }

    def path(self, template: str) -> Path:
        """The file of one template (it may not exist)."""
        text = json.dumps({**self._salt, "template": template}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()}.npz"

    def load(self, template: str) -> Circuit | None:
        """The stored circuit of ``template``, or None (absent, unreadable, or not this one)."""
        try:
            with np.load(self.path(template), allow_pickle=False) as arrays:
                circuit = Circuit.from_arrays(arrays)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return circuit if circuit.template == template else None

    def store(self, circuit: Circuit) -> Path:
        """Write one circuit atomically; returns its file."""
        path = self.path(circuit.template)
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as f:
                np.savez(f, **circuit.to_arrays())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


# --------------------------------------------------------------------------- batch programs


def _ranks(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each element among the elements with its key (in index order); count per key."""
    counts = np.bincount(keys, minlength=n_keys)
    order = np.argsort(keys, kind="stable")
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rank, counts


@dataclass(frozen=True)
class _Layout:
    """A circuit plus what batching needs: node keys (level * G + group) and ranks."""

    circuit: Circuit
    node_key: np.ndarray  # (n_nodes,)
    node_rank: np.ndarray  # (n_nodes,) rank among the circuit's nodes with the same key
    key_count: np.ndarray  # (n_keys,)
    sop_terms: np.ndarray  # (n_sop_terms,) indices of the terms of SOP ops
    term_level: np.ndarray  # (n_sop_terms,) level of each SOP term's op
    term_rank: np.ndarray  # (n_sop_terms,) rank among SOP terms of the same level
    level_count: np.ndarray  # (n_levels,) SOP terms per level
    div_terms: np.ndarray  # (n_div,) the term of each DIV op
    atom_network: np.ndarray  # (n_atoms,) index into the sorted network names
    atoms: list[tuple[str, int, Term]]  # per atom: network name, input slot (-1: none), input
    output_terms: list[Term]  # the answers, with placeholders
    ground: bool  # the template has no variables


def _layout(circuit: Circuit, network_index: Mapping[str, int], groups: int) -> _Layout:
    """Derive the batching layout of a circuit (group: const 0, leaf 1 + network; SOP 0, DIV 1)."""
    c = circuit
    n_consts, n_leaves = len(c.consts), len(c.leaf_atom)
    atom_network = np.array([network_index[n] for n in c.atom_network], dtype=np.int64)
    level = np.concatenate([np.zeros(n_consts + n_leaves, dtype=np.int64), c.op_level])
    group = np.concatenate([np.zeros(n_consts, np.int64), 1 + atom_network[c.leaf_atom], c.op_kind])
    node_key = level * groups + group
    node_rank, key_count = _ranks(node_key, c.n_levels * groups)
    sop_terms = np.flatnonzero(c.op_kind[c.term_op] == SOP)
    term_level = c.op_level[c.term_op[sop_terms]]
    term_rank, level_count = _ranks(term_level, c.n_levels)
    inputs = [Term.from_string(text) for text in c.atom_input]
    slots = [_slot_index(term) for term in inputs]
    return _Layout(
        circuit=c,
        node_key=node_key,
        node_rank=node_rank,
        key_count=key_count,
        sop_terms=sop_terms,
        term_level=term_level,
        term_rank=term_rank,
        level_count=level_count,
        div_terms=np.flatnonzero(c.op_kind[c.term_op] == DIV),
        atom_network=atom_network,
        atoms=[
            (str(name), -1 if slot is None else slot, term)
            for name, slot, term in zip(c.atom_network, slots, inputs)
        ],
        output_terms=[Term.from_string(text) for text in c.output_names],
        ground=Term.from_string(c.template).is_ground(),
    )


def _place(
    items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, int]], n_keys: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Positions in a key-major layout of B copies of each item list.

    Args:
        items: per group (keys (n,), ranks (n,), counts per key, B copies).
        n_keys: number of keys.

    Returns:
        Per group the positions (B, n), and the start of each key's segment, (n_keys + 1,).
    """
    padded = np.zeros((len(items), n_keys), dtype=np.int64)  # (groups, n_keys) counts
    for g, (_, _, counts, _) in enumerate(items):
        padded[g, : len(counts)] = counts
    copies = np.array([b for _, _, _, b in items], dtype=np.int64)  # (groups,)
    starts = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(copies @ padded, out=starts[1:])
    running = starts[:-1].copy()
    positions = []
    for (keys, rank, _, b), counts in zip(items, padded):
        instance = np.arange(b, dtype=np.int64)[:, None]  # (B, 1)
        positions.append(running[keys] + instance * counts[keys] + rank)  # (B, n)
        running += b * counts
    return positions, starts


@dataclass(frozen=True)
class _Group:
    """The instances (queries) of one template in a batch."""

    layout: _Layout
    rows: np.ndarray  # (B, n_atoms) table row of each neural atom of each instance
    out_offset: np.ndarray  # (B,) where each instance's outputs start in the output vector


@dataclass(frozen=True)
class _Program:
    """One batch's flat program: index tensors on the device, and its segments."""

    ints: torch.Tensor  # packed int64 indices
    floats: torch.Tensor  # packed constants (node constants, term coefficients)
    segments: dict[str, tuple[int, int]]  # name -> (start, end) in ints / floats
    node_starts: np.ndarray  # (n_keys + 1,) segment starts of the node vector
    term_starts: np.ndarray  # (n_levels + 1,) segment starts of the SOP terms
    groups: int
    n_levels: int

    def ix(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Entries [start, end) of the index array ``name`` (a view)."""
        a, b = self.segments[name]
        return self.ints[a + start : b if end is None else a + end]

    def fx(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Entries [start, end) of the float array ``name`` (a view)."""
        a, b = self.segments[name]
        return self.floats[a + start : b if end is None else a + end]


def _pack(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Concatenate arrays (one host-to-device copy instead of one each) and name the pieces."""
    segments, start = {}, 0
    for name, a in arrays.items():
        segments[name] = (start, start + len(a))
        start += len(a)
    packed = np.concatenate(list(arrays.values())) if arrays else np.zeros(0)
    return packed, segments


def _build_program(
    groups: Sequence[_Group], network_k: Sequence[int], n_groups: int, n_outputs: int,
    device: torch.device, dtype: torch.dtype,
) -> _Program:  # fmt: skip
    """Lay out every instance of every group in one level-major node vector."""
    n_levels = max(g.layout.circuit.n_levels for g in groups)
    node_pos, node_starts = _place(
        [
            (g.layout.node_key, g.layout.node_rank, g.layout.key_count, len(g.out_offset))
            for g in groups
        ],
        n_levels * n_groups,
    )
    term_pos, term_starts = _place(
        [(g.layout.term_level, g.layout.term_rank, g.layout.level_count, len(g.out_offset))
         for g in groups],
        n_levels,
    )  # fmt: skip
    n, t = int(node_starts[-1]), int(term_starts[-1])
    ints = {name: np.zeros(n, np.int64) for name in ("leaf", "div_a", "div_b")}
    ints.update({name: np.zeros(t, np.int64) for name in ("out", "a", "b")})
    ints["outputs"] = np.zeros(n_outputs, np.int64)
    floats = {"const": np.zeros(n), "coef": np.zeros(t)}
    k = np.asarray(network_k, dtype=np.int64)
    for g, pos, tpos in zip(groups, node_pos, term_pos):
        _fill(g, pos, tpos, k, node_starts, ints, floats)
    packed_ints, int_segments = _pack(ints)
    packed_floats, float_segments = _pack(floats)
    return _Program(
        ints=torch.from_numpy(packed_ints).to(device),
        floats=torch.from_numpy(packed_floats).to(device=device, dtype=dtype),
        segments={**int_segments, **float_segments},
        node_starts=node_starts,
        term_starts=term_starts,
        groups=n_groups,
        n_levels=n_levels,
    )


def _fill(
    g: _Group, pos: np.ndarray, tpos: np.ndarray, network_k: np.ndarray, node_starts: np.ndarray,
    ints: dict[str, np.ndarray], floats: dict[str, np.ndarray],
) -> None:  # fmt: skip
    """Write one group's constants, leaf indices, terms and outputs into the batch arrays."""
    c, lay = g.layout.circuit, g.layout
    n_consts, n_leaves = len(c.consts), len(c.leaf_atom)
    ops = n_consts + n_leaves + np.arange(len(c.op_kind))
    floats["const"][pos[:, :n_consts]] = c.consts
    floats["const"][pos[:, ops]] = c.op_const
    leaf_k = network_k[lay.atom_network[c.leaf_atom]]  # (n_leaves,)
    leaf_flat = g.rows[:, c.leaf_atom] * leaf_k + c.leaf_class  # (B, n_leaves) row * K + j
    ints["leaf"][pos[:, n_consts : n_consts + n_leaves]] = leaf_flat
    sop = lay.sop_terms
    out_node = pos[:, n_consts + n_leaves + c.term_op[sop]]  # (B, n_sop_terms)
    out_key = lay.node_key[n_consts + n_leaves + c.term_op[sop]]  # level * G + SOP
    ints["out"][tpos] = out_node - node_starts[out_key]
    ints["a"][tpos] = pos[:, c.term_a[sop]]
    ints["b"][tpos] = pos[:, c.term_b[sop]]
    floats["coef"][tpos] = c.term_coef[sop]
    div = lay.div_terms
    div_node = pos[:, n_consts + n_leaves + c.term_op[div]]  # (B, n_div)
    ints["div_a"][div_node] = pos[:, c.term_a[div]]
    ints["div_b"][div_node] = pos[:, c.term_b[div]]
    slots = g.out_offset[:, None] + np.arange(len(c.outputs))  # (B, n_outputs)
    ints["outputs"][slots] = pos[:, c.outputs]


def _run_program(program: _Program, tables: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Evaluate a batch program level by level; returns the output values (n_outputs,)."""
    s, g = program.node_starts, program.groups
    parts = [program.fx("const", 0, int(s[1]))]  # level 0: constants, then leaves per network
    for net, probs in enumerate(tables):
        a, b = int(s[1 + net]), int(s[2 + net])
        if b > a:
            parts.append(probs.reshape(-1).index_select(0, program.ix("leaf", a, b)))
    values = torch.cat(parts)  # (n_level0,)
    for level in range(1, program.n_levels):
        lo, mid, hi = int(s[level * g]), int(s[level * g + 1]), int(s[level * g + 2])
        ta, tb = int(program.term_starts[level]), int(program.term_starts[level + 1])
        x_a = values.index_select(0, program.ix("a", ta, tb))  # (T_l,)
        x_b = values.index_select(0, program.ix("b", ta, tb))  # (T_l,)
        terms = x_a * x_b * program.fx("coef", ta, tb)  # (T_l,) coef * x_a * x_b
        sop = program.fx("const", lo, mid).index_add(0, program.ix("out", ta, tb), terms)
        div = values.index_select(0, program.ix("div_a", mid, hi)) / values.index_select(
            0, program.ix("div_b", mid, hi)
        )  # (D_l,) query weight / weight of the constraints
        values = torch.cat([values, sop, div])  # (s[level * g + g],)
    return values.index_select(0, program.ix("outputs"))


# --------------------------------------------------------------------------- the engine


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
        self.device = None if device is None else torch.device(device)
        self.sdd_auto_gc = sdd_auto_gc
        folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
        self.cache = CircuitCache(folder, self.text, sdd_auto_gc=sdd_auto_gc)
        self.stats = {"memory_hits": 0, "disk_hits": 0, "compiled": 0}
        self._names = sorted(self.networks)  # network i of the batch programs
        self._groups = max(2, 1 + len(self._names))  # node groups per level, see _layout
        self._layouts: dict[str, _Layout] = {}  # template text -> layout
        self._by_key: dict[Any, _Layout] = {}  # _template_key -> layout
        self._solver: Solver | None = None

    def _grounding_solver(self) -> Solver:
        """DeepProbLog's exact engine over the program, built on the first cache miss.

        As in :class:`gedi_nesy.logic.dpl.LogicModel`, DeepProbLog's tensor builtins are not
        registered (``add/3`` stays free for programs).
        """
        if self._solver is None:
            lookups = [Network(torch.nn.Identity(), name) for name in self._names]
            model = Model(self.text, lookups, load=False)
            self._solver = model.solver = Solver(model, ExactEngine(model), cache=False)
        return self._solver

    def layout(self, template: Term) -> _Layout:
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
        found = self._layouts[text] = _layout(circuit, index, self._groups)
        return found

    def _instance(self, query: Query | Term, open_output: bool) -> tuple[_Layout, list[Term], int]:
        """(layout, slot terms, output index) of one query; the template is built on a miss."""
        q, output = _instance_query(query, open_output)
        slots: dict[Term, int] = {}
        key = _template_key(q.query, q.substitution, slots)
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
        layout: _Layout, slots: Sequence[Term], tables: Mapping[str, ProbabilityTable]
    ) -> list[int]:
        """The table row of each neural atom of one query."""
        rows = []
        for name, slot, key in layout.atoms:
            if slot >= 0:
                key = slots[slot]
            elif _has_slot(key):
                key = _fill_slots(key, slots)
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
        return device, dtype, probs

    def _evaluate(
        self,
        instances: Sequence[tuple[_Layout, list[Term], int]],
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
            groups.append(_Group(lay, rows_array, offsets[idx]))
        device, dtype, probs = self._table_tensors(tables)
        if int(sizes.sum()) == 0:
            return torch.zeros(0, device=device, dtype=dtype), offsets
        k = [self.networks[name] for name in self._names]
        program = _build_program(groups, k, self._groups, int(sizes.sum()), device, dtype)
        return _run_program(program, probs), offsets

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
            answers.append([_fill_slots(a, slots) if _has_slot(a) else a for a in found])
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
                key = slots[slot] if slot >= 0 else _fill_slots(key, slots)
                keys.setdefault(name, {})[key] = None
        return {name: list(found) for name, found in keys.items()}
