"""KLay's side of benchmarks/klay_speed.py: a query template's SDD loaded into KLay.

The SDD is the one ProbLog compiles for the template in
:func:`gedi_nesy.logic.circuit.compile_circuit` (ground, ``LogicDAG``, ``SDD.create_from``);
KLay gets one root per answer (the answer's SDD conjoined with the program's constraints, as
ProbLog's ``evaluate_custom``) and one for the constraints alone. The literal weights are those
ProbLog's ``extract_weights`` gives DeepProbLog's semiring, recorded by our
:class:`~gedi_nesy.logic.circuit._Recorder` and kept as affine maps of the table entries (a neural
atom's ``p``, an AD's ``1 - sum p``, negative weight 1 for AD choices); unsmoothed, as ProbLog's
NNF evaluation of the same SDD.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from problog.formula import LogicDAG, LogicFormula
from problog.logic import Term
from problog.sdd_formula import SDD

from gedi_nesy.logic.batch import Layout
from gedi_nesy.logic.circuit import _Recorder
from gedi_nesy.logic.template import query_template

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # deepproblog.engines: "PySwip could not be found"
    from deepproblog.engines import ExactEngine
    from deepproblog.model import Model
    from deepproblog.network import Network
    from deepproblog.query import Query
    from deepproblog.solver import Solver


@dataclass(frozen=True)
class KlayCircuit:
    """A KLay module over one template's SDD, and how its literal weights come from tables.

    The weight of literal v is ``c[v] + sum_l m[l, v] * leaf_l``, leaf l being column
    ``leaf_class[l]`` of the table row of atom ``leaf_atom[l]`` (an atom of our layout).
    """

    module: torch.nn.Module
    pos_c: torch.Tensor  # (V,)
    pos_m: torch.Tensor  # (L, V)
    neg_c: torch.Tensor  # (V,)
    neg_m: torch.Tensor  # (L, V)
    leaf_atom: np.ndarray  # (L,)
    leaf_class: np.ndarray  # (L,)
    normalised: bool  # the last root is the constraints' weight, divided out
    circuit: Any  # the klay.Circuit, for modules in other semirings

    @property
    def n_nodes(self) -> int:
        return self.circuit.nb_nodes()

    @property
    def n_layers(self) -> int:
        return len(_eager(self.module).layers)

    def on(self, device: torch.device, dtype: torch.dtype = torch.float64) -> KlayCircuit:
        """The same circuit with its module and weight maps on ``device``, maps in ``dtype``."""
        moved = {name: getattr(self, name).to(device=device, dtype=dtype) for name in
                 ("pos_c", "pos_m", "neg_c", "neg_m")}  # fmt: skip
        return replace(self, module=self.module.to(device), **moved)

    def module_for(self, semiring: str, device: torch.device) -> torch.nn.Module:
        """An eager KLay module of the circuit in another semiring ("log", "mpe", ...)."""
        return self.circuit.to_torch_module(semiring=semiring, compile=False).to(device)


def _eager(module: torch.nn.Module) -> torch.nn.Module:
    """The module under a ``torch.compile`` wrapper (itself when not compiled)."""
    return getattr(module, "_orig_mod", module)


def _affine(nodes: list[tuple[Any, ...]], i: int, leaves: dict) -> tuple[float, dict[int, float]]:
    """Recorded node i as ``const + sum coef_l * leaf_l`` (leaves numbered in ``leaves``)."""
    node = nodes[i]
    if node[0] == "const":
        return node[1], {}
    if node[0] == "leaf":
        return 0.0, {leaves.setdefault(node[1:], len(leaves)): 1.0}
    parts = [_affine(nodes, j, leaves) for j in node[1:]]
    if node[0] == "neg":
        c, coefs = parts[0]
        return 1.0 - c, {k: -v for k, v in coefs.items()}
    if node[0] == "add":
        (c1, d1), (c2, d2) = parts
        return c1 + c2, {k: d1.get(k, 0.0) + d2.get(k, 0.0) for k in d1.keys() | d2.keys()}
    raise SystemExit(f"a literal weight is {node[0]}(...); only affine weights are mapped to KLay")


def _weight(recorder: _Recorder, value: Any, leaves: dict) -> tuple[float, dict[int, float]]:
    """A weight from ``extract_weights`` (a float or a recorded node), as :func:`_affine`."""
    if type(value) is float:
        return value, {}
    return _affine(recorder.nodes, recorder._id(value), leaves)


def _solver(text: str, networks: dict[str, int]) -> Solver:
    """DeepProbLog's exact engine over the program, as CompiledLogic grounds with it."""
    lookups = [Network(torch.nn.Identity(), name) for name in sorted(networks)]
    model = Model(text, lookups, load=False)
    model.solver = Solver(model, ExactEngine(model), cache=False)
    return model.solver


def _klay_roots(sdd: SDD, names: Sequence[str]) -> tuple[list, bool]:
    """SDD roots in our output order: each answer AND the constraints, then the constraints."""
    manager = sdd.get_manager()
    constraints = sdd.get_constraint_inode()
    nodes = {str(name): node for name, node, _ in sdd.labeled()}
    roots = []
    for name in names:
        node = nodes.get(name)
        if node is None or node == sdd.FALSE:
            raise SystemExit(f"{name} has no proof; pick a provable query for the benchmark")
        if node == sdd.TRUE:
            roots.append(constraints)
        else:
            roots.append(manager.conjoin(sdd.get_inode(node), constraints))
    normalised = not manager.is_true(constraints)
    return roots + ([constraints] if normalised else []), normalised


def klay_circuit(
    klay: Any, text: str, networks: dict[str, int], query: Term, layout: Layout,
    compile_module: bool,
) -> KlayCircuit:  # fmt: skip
    """Compile the query's template with ProbLog as ours does, load its SDD into KLay.

    Args:
        klay: the klay package.
        text, networks: the program and its networks' K.
        query: a query (ground, or its output a variable).
        layout: our compiled layout of the same template (its atoms key the leaves).
        compile_module: wrap KLay's module in its default ``torch.compile``.
    """
    template, _ = query_template(query)
    solver = _solver(text, networks)
    ground = solver.engine.ground(Query(template), label=LogicFormula.LABEL_QUERY)
    proof = LogicDAG.create_from(ground, keep_named=True)  # as compile_circuit
    sdd = SDD.create_from(proof, sdd_auto_gc=True)
    roots, normalised = _klay_roots(sdd, list(layout.circuit.output_names))
    circuit = klay.Circuit()
    for root in roots:
        circuit.add_sdd(root)
    recorder, leaves = _Recorder(), {}
    n_vars = sdd.get_manager().varcount
    affine = {"pos": [(1.0, {})] * n_vars, "neg": [(1.0, {})] * n_vars}
    for atom, (pos, neg) in sdd.extract_weights(recorder).items():
        var = sdd.atom2var.get(atom)
        if var is not None:
            affine["pos"][var - 1] = _weight(recorder, pos, leaves)
            affine["neg"][var - 1] = _weight(recorder, neg, leaves)
    atoms = {(str(n), str(i)): a for a, (n, i) in
             enumerate(zip(layout.circuit.atom_network, layout.circuit.atom_input))}  # fmt: skip
    leaf_atom = [atoms[(str(net), str(inputs.args[0]))] for net, inputs, _ in leaves]
    c, m = {}, {}
    for sign, weights in affine.items():
        c[sign] = torch.tensor([w[0] for w in weights], dtype=torch.float64)  # (V,)
        m[sign] = torch.zeros(len(leaves), n_vars, dtype=torch.float64)  # (L, V)
        for v, (_, coefs) in enumerate(weights):
            for leaf, coef in coefs.items():
                m[sign][leaf, v] = coef
    module = circuit.to_torch_module(semiring="real", compile=compile_module)
    return KlayCircuit(module, c["pos"], m["pos"], c["neg"], m["neg"],
                       np.array(leaf_atom, dtype=np.int64),
                       np.array([j for _, _, j in leaves], dtype=np.int64),
                       normalised, circuit)  # fmt: skip


def klay_forward(kc: KlayCircuit, flat: torch.Tensor, leaf_index: torch.Tensor) -> torch.Tensor:
    """Outputs (B, n_outputs) of B instances; ``leaf_index`` (B, L) indexes the flat tables."""
    leaves = flat.index_select(0, leaf_index.reshape(-1)).view(leaf_index.shape)  # (B, L)
    pos = kc.pos_c + leaves @ kc.pos_m  # (B, V) literal weights
    neg = kc.neg_c + leaves @ kc.neg_m  # (B, V)
    roots = kc.module(pos, neg)  # (B, n_roots)
    if not kc.normalised:
        return roots
    return roots[:, :-1] / roots[:, -1:]  # (B, n_outputs) answer / constraints


def klay_leaf_index(kc: KlayCircuit, rows: np.ndarray, flat_start: np.ndarray,
                    atom_k: np.ndarray) -> np.ndarray:  # fmt: skip
    """(B, L) index of each leaf of each instance in the flat tables."""
    atom_rows = rows[:, kc.leaf_atom]  # (B, L)
    start = flat_start[kc.leaf_atom]  # (L,)
    return start + atom_rows * atom_k[kc.leaf_atom] + kc.leaf_class  # (B, L)
