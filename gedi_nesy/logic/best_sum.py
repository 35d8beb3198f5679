"""The most probable sum of an N-digit addition, exactly, for any N (MAP over sums).

With the columns of :mod:`gedi_nesy.logic.chain`, ``T_j[c, d, c'] = P(column(A_j, B_j, c, d, c'))``,
the probability of the sum with digits ``d_0 .. d_{N-1}`` (least significant first) and final
carry ``c`` is

    P(S) = e_0^T M_0(d_0) M_1(d_1) ... M_{N-1}(d_{N-1}) e_c,    M_j(d)[c, c'] = T_j[c, d, c'],

and the best sum maximises it over ``base^N * 2`` choices. The running row vector
``v_j = e_0^T M_0(d_0) ... M_j(d_j)`` (2 carries) is only ever multiplied by non-negative
matrices and read by a non-negative vector (``M_{j+1} ... M_{N-1} e_c``), i.e. the rest of the
chain scores it with a linear functional ``w^T v``, ``w >= 0``. The maximum of ``w^T v`` over a
finite set is reached at a vertex of its convex hull whose outer normal is ``w``; with ``w`` in
the positive quadrant those are the vertices of the upper-right hull, from the point of largest
``v[0]`` to the point of largest ``v[1]``. So after each column only the prefixes whose vectors
are on that hull can still lead to the best sum: :func:`best_sums` keeps only those (a handful),
extends each by every digit, and prunes again. Exact, and linear in N.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["BestSums", "best_sums", "upper_right_hull"]

Point = tuple[float, float, int]  # (v[0], v[1], the partial sum written so far)


class BestSums(NamedTuple):
    """The most probable sum of each query.

    Attributes:
        sums: the best sum of each query (int), (Q,) as a list.
        log_probs: its log-probability, (Q,) float64; ``-inf`` where every sum has probability 0.
    """

    sums: list[int]
    log_probs: torch.Tensor


def upper_right_hull(points: list[Point]) -> list[Point]:
    """The points that maximise ``w[0] x + w[1] y`` for some ``w >= 0``, ``w != 0``.

    The hull runs from the point of largest x (largest y among those) to the point of largest y,
    concave, x falling and y rising. A point on a hull edge, or equal to another, is dropped
    (it ties at best); of equal points the one with the smallest partial sum is kept.

    Args:
        points: (x, y, partial sum) with x, y >= 0.

    Returns:
        The hull's vertices, x falling.
    """
    hull: list[Point] = []
    for p in sorted(points, key=lambda p: (-p[0], -p[1], p[2])):
        if hull and p[1] <= hull[-1][1]:
            continue  # x and y both no larger than the last vertex's: never strictly better
        while len(hull) >= 2:
            (ax, ay, _), (bx, by, _) = hull[-2], hull[-1]
            if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                break  # b lies strictly above the segment a-p: a vertex
            hull.pop()
        hull.append(p)
    return hull


def _best_of_query(cells: list, base: int) -> tuple[int, float]:
    """(best sum, its log-probability) of one query from its columns, nested lists
    [column j][c][d][c'] (N x 2 x base x 2), least significant column first."""
    points: list[Point] = [(1.0, 0.0, 0)]  # e_0: carry 0 into column 0, nothing written
    log_scale = 0.0  # P = value * exp(log_scale)
    for j, (from0, from1) in enumerate(cells):  # from_c[d][c'] = M_j(d)[c, c']
        place = base**j
        step = [
            (x * a0 + y * b0, x * a1 + y * b1, s + d * place)
            for x, y, s in points
            for d, ((a0, a1), (b0, b1)) in enumerate(zip(from0, from1))
        ]  # (v M_j(d))[c'] for every kept prefix v and digit d
        top = max(max(x, y) for x, y, _ in step)
        if top > 0:  # rescale: largest entry 1 (the hull does not change)
            step = [(x / top, y / top, s) for x, y, s in step]
            log_scale += math.log(top)
        points = upper_right_hull(step)
    top = base ** len(cells)
    value, neg_sum = max((v, -(s + c * top)) for x, y, s in points for c, v in ((0, x), (1, y)))
    return -neg_sum, (math.log(value) + log_scale if value > 0 else -math.inf)


def best_sums(cells: torch.Tensor) -> BestSums:
    """The most probable sum of each query, by pruning prefixes to the upper-right hull.

    Ties between sums of equal probability go to the smallest sum when the tied prefixes have
    equal vectors; otherwise a tie may go to either sum.

    Args:
        cells: ``T_j[c, d, c'] = P(column(A_j, B_j, c, d, c'))`` per query and column, least
            significant first, (Q, N, 2, base, 2); non-negative. Read as float64, not
            differentiated.

    Returns:
        The best sums (``d_0 + d_1 base + ... + c base^N``) and their log-probabilities.
    """
    base = cells.shape[3]
    table = cells.detach().to(device="cpu", dtype=torch.float64).tolist()  # (Q, N, 2, base, 2)
    found = [_best_of_query(query, base) for query in table]  # Q x (sum, log P)
    sums = [s for s, _ in found]
    return BestSums(sums, torch.tensor([lp for _, lp in found], dtype=torch.float64))
