"""One compiled query template: DeepProbLog's circuit recorded and flattened into plain arrays.

A template (see :mod:`gedi_nesy.logic.template`) is grounded and compiled ONCE, by
DeepProbLog's own exact engine (``nn/4`` turned into annotated disjunctions) and ProbLog's SDD
compiler, and the arithmetic of DeepProbLog's ``ArithmeticCircuit.evaluate`` is *recorded*
rather than computed: ProbLog's SDD evaluator runs with :class:`_Recorder`, a semiring that
mirrors ``GraphSemiring`` (AD weights, smoothing, normalisation by the weight of the
constraints) but returns node ids. The recorded DAG is rewritten into sum-of-binary-product
nodes ``c + sum_t coef_t * x_a(t) * x_b(t)`` (a sum or a product with one consumer is merged
into it), levelled, and stored as plain index arrays (:class:`Circuit`), which
:mod:`gedi_nesy.logic.batch` evaluates a minibatch at a time.

Differences from stock DeepProbLog: ``x * 0.0`` with a plain-float zero is dropped (as
:class:`gedi_nesy.logic.dpl.ExactZeroSemiring` does; the same values and gradients for finite
inputs), and sums and products are re-associated, so results agree to rounding (~1e-16
relative in float64). A ``t(i)`` learnable probability is recorded as a leaf of the
pseudo-network :data:`~gedi_nesy.logic.params.PARAMETER_NETWORK` (column i of its one row).
Not supported, as in :func:`gedi_nesy.logic.program.check_program`: ``nn/3`` / ``nn/2``,
networks with several inputs, DeepProbLog's tensor builtins.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from problog.errors import ProbLogError
from problog.evaluator import Semiring
from problog.formula import LogicDAG, LogicFormula
from problog.logic import Constant, Term, list2term, term2list
from problog.sdd_formula import SDD

from gedi_nesy.errors import ProgramError
from gedi_nesy.logic.params import PARAMETER_KEY, PARAMETER_NETWORK

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # deepproblog.engines: "PySwip could not be found"
    from deepproblog.query import Query
    from deepproblog.solver import Solver

__all__ = ["DIV", "FORMAT_VERSION", "SOP", "Circuit", "compile_circuit", "is_exact"]

FORMAT_VERSION = 1  # bump when the stored arrays change meaning
SOP, DIV = 0, 1  # op kinds: sum of binary products, division (the normaliser of a query)
PARAMETER_INPUTS = list2term([PARAMETER_KEY])  # t(i) is column i of the pseudo-network's row


# --------------------------------------------------------------------------- recording semiring


class _Ref:
    """A recorded circuit node, as a value flowing through ProbLog's evaluator."""

    __slots__ = ("id",)

    def __init__(self, node_id: int) -> None:
        self.id = node_id

    def __repr__(self) -> str:
        return f"_Ref({self.id})"


def is_exact(a: Any, value: float) -> bool:
    """Whether ``a`` is the plain float ``value`` (a recorded node or a tensor never is: each
    carries a gradient). Both semirings that drop ``x * 0.0`` use it."""
    return type(a) is float and a == value


class _Recorder(Semiring):
    """DeepProbLog's GraphSemiring arithmetic, recorded as a hash-consed DAG.

    Plain floats are folded exactly as GraphSemiring folds them (0 + x, 1 * x, float op float);
    ``x * 0.0`` is 0.0 as in :class:`gedi_nesy.logic.dpl.ExactZeroSemiring`. Everything else
    becomes a node ``("add" | "mul" | "div", a, b)``, ``("neg", a)`` (1 - a), ``("const", v)`` or
    ``("leaf", network, inputs, j)`` (column j of the network's output on ``inputs``; ``t(i)`` is
    column i of the parameter pseudo-network's one row).
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
        if is_exact(b, 0.0):
            return a
        if is_exact(a, 0.0):
            return b
        if type(a) is float and type(b) is float:
            return a + b
        return self._binary("add", a, b, commutative=True)

    def times(self, a: Any, b: Any) -> Any:
        if is_exact(a, 0.0) or is_exact(b, 0.0):
            return 0.0
        if is_exact(b, 1.0):
            return a
        if is_exact(a, 1.0):
            return b
        if type(a) is float and type(b) is float:
            return a * b
        return self._binary("mul", a, b, commutative=True)

    def negate(self, a: Any) -> Any:
        if type(a) is float:
            return 1.0 - a
        return self._node("neg", a.id)

    def normalize(self, a: Any, z: Any) -> Any:
        if is_exact(z, 1.0):
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
        if type(a) is Term and a.functor == "t":  # DeepProbLog's t(i): parameter i
            return self._node("leaf", PARAMETER_NETWORK, PARAMETER_INPUTS, int(a.args[0]))
        if type(a) is Term and a.functor == "tensor":
            raise ProgramError(
                f"probability {a} is a tensor(...) term; compiled inference serves fixed "
                f"probabilities, t(...) and nn/4 only, use engine 'deepproblog' for this program"
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
    def n_levels(self) -> int:
        return 1 + int(self.op_level.max(initial=0))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The circuit as named numpy arrays (no Python objects), for ``np.savez``."""
        arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        arrays["template"] = np.array(self.template)
        arrays["provable"] = np.array(self.provable)
        arrays["format"] = np.array(FORMAT_VERSION)
        arrays["digest"] = np.array(content_digest(arrays))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Circuit:
        """Inverse of :meth:`to_arrays`; raises KeyError or ValueError on a foreign file."""
        if int(arrays["format"]) != FORMAT_VERSION:
            raise ValueError(f"format {int(arrays['format'])}, expected {FORMAT_VERSION}")
        if str(arrays["digest"]) != content_digest(arrays):
            raise ValueError("the arrays do not match their digest (the file was altered)")
        fields = {name: np.asarray(arrays[name]) for name in _ARRAY_FIELDS}
        return cls(template=str(arrays["template"]), provable=bool(arrays["provable"]), **fields)


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a circuit's arrays (every one but ``digest``: name, dtype, shape, bytes), so
    a cache file altered into another valid archive is told apart from the one written."""
    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k != "digest"):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


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
