"""The most probable sum by hull pruning (gedi_nesy/logic/best_sum.py): the hull by hand, equal to
brute force over all 2 * 10^N sums at N = 1-4, and exact on long one-hot numbers."""

from __future__ import annotations

import math

import pytest
import torch

from gedi_nesy.logic.best_sum import best_sums, upper_right_hull
from gedi_nesy.logic.chain import sum_distribution


def test_upper_right_hull_by_hand():
    points = [
        (1.0, 0.0, 0),  # largest x: first vertex
        (0.9, 0.5, 1),  # vertex: x + y = 1.4 > 1, above the segment (1, 0)-(0, 1)
        (0.5, 0.5, 2),  # dominated by (0.9, 0.5)
        (0.6, 0.6, 3),  # below the edge (0.9, 0.5)-(0, 1): y = 1 - 0.6 * 0.5 / 0.9 = 0.667 there
        (0.0, 1.0, 5),  # largest y: last vertex
        (0.0, 1.0, 6),  # equal to 5: the smaller partial sum stays
        (0.0, 0.0, 7),  # dominated
    ]
    assert [p[2] for p in upper_right_hull(points)] == [0, 1, 5]
    assert upper_right_hull([(0.0, 0.0, 3), (0.0, 0.0, 1)]) == [(0.0, 0.0, 1)]
    edge = [(0.5, 0.0, 0), (0.25, 0.25, 1), (0.0, 0.5, 2)]  # 1 on the edge: ties at best
    assert [p[2] for p in upper_right_hull(edge)] == [0, 2]
    above = [(0.5, 0.0, 0), (0.25, 0.375, 1), (0.0, 0.5, 2)]  # 1 strictly above it
    assert [p[2] for p in upper_right_hull(above)] == [0, 1, 2]


def random_cells(q: int, n: int, seed: int) -> torch.Tensor:
    """Random columns (Q, N, 2, 10, 2), float64, each column's rows normalised like a column of
    digit probabilities (sum over d, c' of T[c, d, c'] = 1), carry 1 into column 0 impossible."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.rand(q, n, 2, 10, 2, generator=gen, dtype=torch.float64) ** 3  # skewed
    cells[:, 0, 1] = 0.0
    return cells / cells.sum((3, 4), keepdim=True).clamp_min(1e-300)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_equals_brute_force_over_all_sums(n):
    cells = random_cells(64, n, seed=n)
    dist = sum_distribution(cells)  # (64, 2 * 10^N): every sum
    best = best_sums(cells)
    assert best.sums == dist.argmax(1).tolist()
    assert torch.allclose(best.log_probs, dist.max(1).values.log(), rtol=1e-12, atol=0)


def test_a_probability_of_zero_everywhere_gives_minus_infinity():
    cells = torch.zeros(1, 3, 2, 10, 2, dtype=torch.float64)
    best = best_sums(cells)
    assert best.sums == [0] and best.log_probs.tolist() == [-math.inf]


@pytest.mark.parametrize("n", [15, 100])
def test_long_one_hot_numbers_and_their_probability(n):
    # each image 0.9 on its digit, 0.1 / 9 on each other: the best sum is the true one, and its
    # probability is at least that of the true digits' path, 0.81^N (1e-10 at N = 100: fine in
    # float64, but the hull's rescaling keeps it exact for any N)
    gen = torch.Generator().manual_seed(n)
    a = torch.randint(0, 10, (n,), generator=gen)  # digits of A, least significant first
    b = torch.randint(0, 10, (n,), generator=gen)
    pa = torch.full((n, 10), 0.1 / 9, dtype=torch.float64).scatter_(1, a.view(-1, 1), 0.9)
    pb = torch.full((n, 10), 0.1 / 9, dtype=torch.float64).scatter_(1, b.view(-1, 1), 0.9)
    cells = torch.zeros(1, n, 2, 10, 2, dtype=torch.float64)
    for x in range(10):
        for y in range(10):
            for c in (0, 1):
                total = x + y + c
                cells[0, :, c, total % 10, total // 10] += pa[:, x] * pb[:, y]
    cells[0, 0, 1] = 0.0
    number = sum(int(d) * 10**j for j, d in enumerate(a.tolist()))
    other = sum(int(d) * 10**j for j, d in enumerate(b.tolist()))
    best = best_sums(cells)
    assert best.sums == [number + other]
    assert best.log_probs.item() > 2 * n * math.log(0.9)  # at least the path of the true digits
    assert best.log_probs.item() < math.log(0.9)  # and well below 1
