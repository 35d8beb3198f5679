"""The batched evaluator: every query of a minibatch, whatever its template, in one pass.

Each compiled :class:`~gedi_nesy.logic.circuit.Circuit` gets a :class:`Layout` (its nodes keyed by
level and group, ranked within a key). A batch lays out every instance (query) of every template
in one level-major node vector: level 0 gathers the neural probabilities from the (n, K)
tables, each further level is two gathers, a product and a scatter-add over every query's
nodes at once; one ``backward`` then reaches the tables.

Numerics: plain probabilities in the tables' dtype, as DeepProbLog computes them (log space
cannot hold the AD complements ``1 - sum p``, which DeepProbLog evaluates and which may round to
slightly below 0). A product of 2N table entries underflows float32 only below ~1e-38, that is
where -log p > 87; DeepProbLog underflows at the same point. On CUDA the scatter-add sums in no
fixed order (last-bit differences).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from problog.logic import Term

from gedi_nesy.logic.circuit import DIV, SOP, Circuit
from gedi_nesy.logic.template import slot_index

__all__ = ["Group", "Layout", "Program", "build_program", "circuit_layout", "run_program"]


def _ranks(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each element among the elements with its key (in index order); count per key."""
    counts = np.bincount(keys, minlength=n_keys)
    order = np.argsort(keys, kind="stable")
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rank, counts


@dataclass(frozen=True)
class Layout:
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


def circuit_layout(circuit: Circuit, network_index: Mapping[str, int], groups: int) -> Layout:
    """Derive the batching layout of a circuit.

    Args:
        circuit: a compiled template.
        network_index: network name -> its index in the batch (the sorted network names).
        groups: node groups per level, G >= 2 and >= 1 + the number of networks (level 0:
            constants 0, leaves of network i 1 + i; further levels: SOP 0, DIV 1).

    Returns:
        The :class:`Layout`.
    """
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
    slots = [slot_index(term) for term in inputs]
    return Layout(
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
class Group:
    """The instances (queries) of one template in a batch."""

    layout: Layout
    rows: np.ndarray  # (B, n_atoms) table row of each neural atom of each instance
    out_offset: np.ndarray  # (B,) where each instance's outputs start in the output vector


@dataclass(frozen=True)
class Program:
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


def build_program(
    groups: Sequence[Group], network_k: Sequence[int], n_groups: int, n_outputs: int,
    device: torch.device, dtype: torch.dtype,
) -> Program:  # fmt: skip
    """Lay out every instance of every group in one level-major node vector.

    Args:
        groups: per template in the batch, its instances.
        network_k: K of each network, in batch order.
        n_groups: node groups per level (as for :func:`circuit_layout`).
        n_outputs: the outputs of all instances together.
        device: where the program runs.
        dtype: the tables' dtype (constants and coefficients are cast to it).

    Returns:
        The :class:`Program`, its index tensors on ``device``.
    """
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
    return Program(
        ints=torch.from_numpy(packed_ints).to(device),
        floats=torch.from_numpy(packed_floats).to(device=device, dtype=dtype),
        segments={**int_segments, **float_segments},
        node_starts=node_starts,
        term_starts=term_starts,
        groups=n_groups,
        n_levels=n_levels,
    )


def _fill(
    g: Group, pos: np.ndarray, tpos: np.ndarray, network_k: np.ndarray, node_starts: np.ndarray,
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


def run_program(program: Program, tables: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Evaluate a batch program level by level.

    Args:
        program: from :func:`build_program`.
        tables: per network (batch order) its (n, K) probabilities, None when not given.

    Returns:
        The output values, (n_outputs,), differentiable w.r.t. the tables.
    """
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
