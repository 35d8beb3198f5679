"""The column circuit as a tensor: ``P(column(A, B, c, d, c'))`` for every digit pair at once.

The images of one column are independent annotated disjunctions, so the program's compiled
``column/5`` circuit of cell (c, d, c') is the bilinear form

    P(column(A, B, c, d, c')) = sum_{a,b} p_A(a) p_B(b) M[a, b, c, d, c'],
    M[a, b, c, d, c'] = P(column(A, B, c, d, c') | A = a, B = b),

and, for one image in both places, ``sum_a p_A(a) S[a, c, d, c']`` with
``S[a] = P(column(A, A, c, d, c') | A = a)``. :func:`build_column_tensors` reads M and S off the
program's own circuits with one-hot tables, once, in float64 (probabilistic facts in the column
are part of the circuit, so part of M), and checks the bilinear form against the circuits on
random unnormalised tables: equal values off the simplex make the forms the same polynomial, so
their gradients are equal too. :func:`column_cells` then evaluates every cell of every column of
a batch with two gathers and one matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from problog.logic import Constant, Term

from gedi_nesy.errors import DataError, ProgramError
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.program import ProbabilityTable

__all__ = [
    "ColumnTensors",
    "build_column_tensors",
    "column_cells",
    "column_keys",
    "column_provable",
]


@dataclass(frozen=True)
class ColumnTensors:
    """The column circuit per digit value, and what its cells read and prove.

    Attributes:
        pair: ``M[a, b, cell]`` for two images, (K, K, cells), float64; cells in (c, d, c') order
            (c, c' in {0, 1}, d in ``0 .. base - 1``).
        same: ``S[a, cell]`` for one image in both places, (K, cells), float64.
        pair_provable: which cells have a proof with two images, (cells,) bool.
        same_provable: likewise with one image, (cells,) bool.
        pair_reads: the argument positions (0 for A, 1 for B) the circuits read, first-seen order
            over the cells (the order ``CompiledLogic.referenced_keys`` names them).
        same_reads: whether the one-image circuits read the image.
    """

    pair: torch.Tensor
    same: torch.Tensor
    pair_provable: torch.Tensor
    same_provable: torch.Tensor
    pair_reads: tuple[int, ...]
    same_reads: bool
    _moved: dict = field(default_factory=dict, repr=False, compare=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(pair as (K * K, cells), same as (K, cells)) on ``device`` in ``dtype``, cached."""
        key = (device, dtype)
        if key not in self._moved:
            k = self.same.shape[0]
            self._moved[key] = (
                self.pair.reshape(k * k, -1).to(device=device, dtype=dtype),  # (K*K, cells)
                self.same.to(device=device, dtype=dtype),  # (K, cells)
            )
        return self._moved[key]


def _key(tag: str, i: int) -> Term:
    return Term("tensor", Term(tag, Constant(i)))


def _cell_terms(column: str, a: Term, b: Term, base: int) -> list[Term]:
    """``column(a, b, c, d, c')`` for every cell, in (c, d, c') order."""
    return [
        Term(column, a, b, Constant(c), Constant(d), Constant(e))
        for c in (0, 1)
        for d in range(base)
        for e in (0, 1)
    ]


def build_column_tensors(
    logic: CompiledLogic, network: str, column: str, base: int
) -> ColumnTensors:
    """M and S of the module docstring from the program's own ``column/5`` circuits.

    Args:
        logic: the compiled engine over the program.
        network: the digit network (K outputs); the column reads its images.
        column: the column predicate, ``column(A, B, Cin, D, Cout)``.
        base: the digit base (D ranges over ``0 .. base - 1``).

    Raises:
        DataError: the program cannot compile the column (e.g. no ``column/5``).
        ProgramError: the column circuits are not bilinear in the two images' tables.
    """
    k = logic.networks[network]
    a_keys, b_keys = (
        [_key("gedi_column_a", i) for i in range(k)],
        [_key("gedi_column_b", i) for i in range(k)],
    )
    eye = torch.eye(k, dtype=torch.float64)  # (K, K) one-hot rows
    table = ProbabilityTable(a_keys + b_keys, torch.cat([eye, eye]))  # (2K, K)
    terms = [t for a in a_keys for b in b_keys for t in _cell_terms(column, a, b, base)]
    terms += [t for a in a_keys for t in _cell_terms(column, a, a, base)]
    try:
        probs, provable = logic.query_probs(terms, {network: table})  # (K*K*cells + K*cells,)
    except ProgramError as exc:
        raise DataError(str(exc)) from None  # the caller names the engine that cannot run
    cells = 4 * base
    pair = probs[: k * k * cells].detach().view(k, k, cells)  # (K, K, cells)
    same = probs[k * k * cells :].detach().view(k, cells)  # (K, cells)
    order = logic.referenced_keys(_cell_terms(column, a_keys[0], b_keys[0], base))
    found = order.get(network, [])
    tensors = ColumnTensors(
        pair=pair,
        same=same,
        pair_provable=provable[:cells].clone(),
        same_provable=provable[k * k * cells : k * k * cells + cells].clone(),
        pair_reads=tuple(0 if key == a_keys[0] else 1 for key in found),
        same_reads=bool(logic.referenced_keys(_cell_terms(column, a_keys[0], a_keys[0], base))),
    )
    _check_bilinear(logic, tensors, network, column, base)
    return tensors


def _check_bilinear(
    logic: CompiledLogic, tensors: ColumnTensors, network: str, column: str, base: int
) -> None:
    """The tensors equal the circuits on random unnormalised tables (values and so gradients)."""
    k = tensors.same.shape[0]
    gen = torch.Generator().manual_seed(0)
    rows = torch.rand(4, k, generator=gen, dtype=torch.float64) + 0.5  # (4, K), sums != 1
    keys = [_key("gedi_column_check", i) for i in range(4)]
    terms = _cell_terms(column, keys[0], keys[1], base) + _cell_terms(
        column, keys[2], keys[2], base
    )
    theirs = logic.query_probs(terms, {network: ProbabilityTable(keys, rows)}).probs  # (2 cells,)
    ours = column_cells(
        tensors, rows, torch.tensor([[0, 2]]), torch.tensor([[1, 2]])
    ).flatten()  # (2 cells,)
    if not torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12):
        raise ProgramError(
            f"{logic.source}: {column}/5 is not bilinear in its two images' probabilities (its "
            f"circuits give {theirs.tolist()[:4]}..., the bilinear form {ours.tolist()[:4]}...); "
            "use logic.engine: compiled"
        )


def column_cells(
    tensors: ColumnTensors, probs: torch.Tensor, rows_a: torch.Tensor, rows_b: torch.Tensor
) -> torch.Tensor:
    """``P(column(A_j, B_j, c, d, c'))`` for every query, column and cell.

    Args:
        tensors: the column tensors (:func:`build_column_tensors`).
        probs: the digit network's table, (n, K).
        rows_a: the table row of each column's A image, (Q, N), int64.
        rows_b: likewise for B, (Q, N); a column with ``rows_a == rows_b`` reads one image.

    Returns:
        The cell probabilities, (Q, N, cells), on ``probs``' device and dtype.
    """
    pair, same = tensors.on(probs.device, probs.dtype)  # (K*K, cells), (K, cells)
    q, n = rows_a.shape
    k = probs.shape[1]
    rows_a, rows_b = rows_a.to(probs.device), rows_b.to(probs.device)
    p_a, p_b = probs[rows_a], probs[rows_b]  # (Q, N, K) each
    outer = (p_a.unsqueeze(-1) * p_b.unsqueeze(-2)).reshape(q * n, k * k)  # (QN, K*K)
    two = (outer @ pair).view(q, n, -1)  # (Q, N, cells): p_A^T M p_B
    one = p_a @ same  # (Q, N, cells): p_A^T S
    return torch.where((rows_a == rows_b).unsqueeze(-1), one, two)  # (Q, N, cells)


def column_provable(
    tensors: ColumnTensors, same_image: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """1 where the cell has a proof, else 0, (Q, N, cells), from whether each column reads one
    image (``same_image`` (Q, N) bool)."""
    device = same_image.device
    pair = tensors.pair_provable.to(device=device, dtype=dtype)  # (cells,)
    one = tensors.same_provable.to(device=device, dtype=dtype)  # (cells,)
    return torch.where(same_image.unsqueeze(-1), one, pair)  # (Q, N, cells)


def column_keys(tensors: ColumnTensors, columns: Sequence[tuple[Term, Term]]) -> list[Term]:
    """The inputs one query's columns read, in the order the column circuits read them."""
    keys = []
    for a, b in columns:
        if a == b:
            keys.extend([a] if tensors.same_reads else [])
        else:
            keys.extend((a, b)[i] for i in tensors.pair_reads)
    return keys
