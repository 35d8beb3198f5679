"""The programs in programs/: hand-computed probabilities, agreement with stock DeepProbLog, and
the multi-digit program's exactness and linear size.

Fixed table (tests/conftest.py): image 0 is digit 1 (0.4) or 2 (0.6); image 1 is 3 or 4 (0.5
each); image 2 is 0 (0.1) or 9 (0.9); image 3 is 7 (1.0); images 4-7 are dense.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from deepproblog.query import Query
from problog.formula import LogicDAG, LogicFormula
from problog.logic import Constant, Term, list2term

from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.logic.program import ProbabilityTable

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
NETWORKS = {"digit_net": 10}
PROGRAM_FILES = ["addition.pl", "product.pl", "less_than.pl", "multi_addition.pl"]


def img(i: int) -> Term:
    return Term("tensor", Term("img", Constant(i)))


def add(a: list[int], b: list[int], s: int) -> Query:
    """``add([img(a1), ...], [img(b1), ...], s)``, most significant digit first.

    Built as the task builder does: placeholders ``pI_J`` and a substitution, so queries with
    the same N and sum share one compiled circuit across the tests of this module.
    """
    names = [[Term(f"p{i}_{j}") for j in range(len(a))] for i in range(2)]
    subs = {
        name: img(k)
        for row, ks in zip(names, (a, b), strict=True)
        for name, k in zip(row, ks, strict=True)
    }
    return Query(Term("add", list2term(names[0]), list2term(names[1]), Constant(s)), subs)


@pytest.fixture(scope="module")
def logic() -> dict[str, LogicModel]:
    """One LogicModel per program, shared by the module so circuits are compiled once."""
    return {name: LogicModel(PROGRAMS / name, NETWORKS) for name in PROGRAM_FILES}


def probs_of(model: LogicModel, queries: list[Term | Query], table: dict) -> list[float]:
    queries = [q if isinstance(q, Query) else Query(q) for q in queries]
    return model.query_probs(queries, table).probs.tolist()


def test_every_program_has_a_header_naming_the_network():
    for name in PROGRAM_FILES:
        text = (PROGRAMS / name).read_text()
        header = text.split("\n\n")[0]
        assert all(line.startswith("%") for line in header.splitlines()), name
        assert "digit_net" in header and "[0..9]" in header, name


def test_addition_by_hand(logic, digit_table):
    terms = [
        Term("addition", img(0), img(1), Constant(5)),  # p = 0.5 = 0.4*0.5 + 0.6*0.5
        Term("addition", img(0), img(1), Constant(6)),  # p = 0.3 = 0.6*0.5
        Term("addition", img(0), img(0), Constant(4)),  # p = 0.6: one image, one digit (2)
        Term("addition", img(2), img(3), Constant(16)),  # p = 0.9 = 0.9*1.0
    ]
    assert probs_of(logic["addition.pl"], terms, digit_table) == pytest.approx(
        [0.5, 0.3, 0.6, 0.9], abs=1e-12
    )


def test_product_by_hand(logic, digit_table):
    terms = [
        Term("product", img(0), img(1), Constant(8)),  # p = 0.3 = 0.6*0.5 (2*4)
        Term("product", img(0), img(1), Constant(4)),  # p = 0.2 = 0.4*0.5 (1*4)
        Term("product", img(2), img(1), Constant(0)),  # p = 0.1 = 0.1*1.0 (0*3, 0*4)
    ]
    assert probs_of(logic["product.pl"], terms, digit_table) == pytest.approx(
        [0.3, 0.2, 0.1], abs=1e-12
    )


def test_less_than_by_hand(logic, digit_table):
    terms = [
        Term("less", img(0), img(1)),  # p = 1.0: {1, 2} < {3, 4}
        Term("less", img(1), img(0)),  # p = 0.0
        Term("less", img(2), img(3)),  # p = 0.1 = P(0 < 7) = 0.1*1.0
    ]
    assert probs_of(logic["less_than.pl"], terms, digit_table) == pytest.approx(
        [1.0, 0.0, 0.1], abs=1e-12
    )


def test_multi_addition_by_hand(logic, digit_table):
    # [d0, d2] + [d1, d3] = 10*(d0 + d1) + d2 + 7, with d3 = 7
    terms = [
        add([0, 2], [1, 3], 57),  # p = 0.05 = P(d2=0) * P(d0+d1=5) = 0.1*0.5
        add([0, 2], [1, 3], 66),  # p = 0.45 = P(d2=9) * P(d0+d1=5) = 0.9*0.5 (carry 1)
        add([0, 2], [1, 3], 76),  # p = 0.27 = P(d2=9) * P(d0+d1=6) = 0.9*0.3
        add([0, 2], [1, 3], 68),  # p = 0.0: the last digit is 7 (d2=0) or 6 (d2=9)
    ]
    assert probs_of(logic["multi_addition.pl"], terms, digit_table) == pytest.approx(
        [0.05, 0.45, 0.27, 0.0], abs=1e-12
    )


STOCK_CASES = {
    "addition": (
        "addition.pl",
        [
            Term("addition", img(4), img(5), Constant(9)),
            Term("addition", img(4), img(4), Constant(8)),
            Term("addition", img(6), img(7), Constant(0)),
            Term("addition", img(0), img(6), Constant(11)),
            Term("addition", img(4), img(5), Constant(19)),  # no proof
        ],
    ),
    "product": (
        "product.pl",
        [
            Term("product", img(4), img(5), Constant(12)),
            Term("product", img(5), img(6), Constant(0)),
            Term("product", img(4), img(4), Constant(49)),
        ],
    ),
    "less_than": (
        "less_than.pl",
        [Term("less", img(4), img(5)), Term("less", img(5), img(4)), Term("less", img(6), img(6))],
    ),
    "multi_n1": ("multi_addition.pl", [add([4], [5], 13), add([6], [7], 4)]),
    "multi_n2": ("multi_addition.pl", [add([4, 5], [6, 7], 97), add([4, 0], [1, 7], 57)]),
    "multi_n3": ("multi_addition.pl", [add([4, 5, 6], [7, 0, 2], 1033)]),
}


@pytest.mark.parametrize("case", list(STOCK_CASES))
def test_matches_stock_deepproblog(case, logic, digit_probs, stock_model_factory):
    """Same probabilities and gradients as stock Model.solve (stock semiring and Network)."""
    program, queries = STOCK_CASES[case]
    queries = [q if isinstance(q, Query) else Query(q) for q in queries]
    terms = [q.substitute().query for q in queries]  # stock DeepProbLog gets the ground terms
    stock_probs = digit_probs.detach().clone().requires_grad_()  # (8, 10)
    stock = stock_model_factory(PROGRAMS / program, stock_probs)
    results = stock.solve([Query(t) for t in terms])
    expected = [r.result[t] for r, t in zip(results, terms, strict=True)]
    keys = [img(i) for i in range(digit_probs.shape[0])]
    table = {"digit_net": ProbabilityTable(keys, digit_probs)}
    ours = logic[program].query_probs(queries, table).probs  # (Q,)
    assert ours.tolist() == pytest.approx([float(p) for p in expected], abs=1e-9)

    weights = torch.arange(1.0, len(terms) + 1, dtype=torch.float64)  # (Q,) distinct weights
    sum(w * p for w, p in zip(weights, expected, strict=True)).backward()
    (weights * ours).sum().backward()
    assert torch.allclose(digit_probs.grad, stock_probs.grad, atol=1e-9, rtol=0.0)
    assert digit_probs.grad.abs().sum() > 0


def test_multi_addition_is_one_hot_for_one_hot_digits(logic):
    digits = [3, 7, 4, 9]  # 37 + 49 = 86
    probs = torch.nn.functional.one_hot(torch.tensor(digits), 10).double()  # (4, 10)
    table = {"digit_net": ProbabilityTable([img(i) for i in range(4)], probs)}
    sums = [86, 76, 186]
    queries = [add([0, 1], [2, 3], s) for s in sums]
    assert probs_of(logic["multi_addition.pl"], queries, table) == [1.0, 0.0, 0.0]


def test_multi_addition_matches_enumeration(logic, digit_table, digit_probs):
    p = digit_probs.detach()
    a, b = [4, 5], [6, 7]  # images of the two 2-digit numbers

    def enumerated(s: int) -> float:
        total = 0.0
        for d in itertools.product(range(10), repeat=4):
            if 10 * d[0] + d[1] + 10 * d[2] + d[3] == s:
                total += float(p[a[0], d[0]] * p[a[1], d[1]] * p[b[0], d[2]] * p[b[1], d[3]])
        return total

    sums = [57, 76, 97]
    got = probs_of(logic["multi_addition.pl"], [add(a, b, s) for s in sums], digit_table)
    assert got == pytest.approx([enumerated(s) for s in sums], abs=1e-12)
    assert min(got) > 0


def test_multi_addition_answers_match_enumeration(logic, digit_table, digit_probs):
    p = digit_probs.detach()
    query = add([4], [5], 0)  # answer_probs replaces the sum by a variable
    dist = logic["multi_addition.pl"].answer_probs([query], list(range(19)), digit_table)
    expected = [sum(float(p[4, i] * p[5, s - i]) for i in range(10) if 0 <= s - i <= 9)
                for s in range(19)]  # fmt: skip
    assert dist.probs[0].tolist() == pytest.approx(expected, abs=1e-12)


def ground_size(model: LogicModel, query: Query) -> int:
    """Nodes of the ground program (before knowledge compilation) of one query."""
    engine = model.model.solver.engine
    ground = engine.ground(query, label=LogicFormula.LABEL_QUERY)
    return len(LogicDAG.create_from(ground, keep_named=True))


def test_multi_addition_ground_program_is_linear_in_n(logic):
    """Column addition: each extra digit adds the same number of ground nodes.

    A program that enumerates the numbers (number(As, NA), number(Bs, NB), S is NA + NB)
    grounds 30, 246, 2268 nodes for N = 1, 2, 3 and fails both checks.
    """
    model = logic["multi_addition.pl"]
    sizes = []
    for n in range(1, 5):
        s = int("7" * n) + int("5" * n)
        sizes.append(ground_size(model, add(list(range(n)), list(range(4, 4 + n)), s)))
    assert sizes[3] - sizes[2] == sizes[2] - sizes[1]
    assert sizes[3] < 8 * sizes[0]


def test_multi_addition_circuit_grows_slowly(logic, digit_table, count_autograd_nodes):
    """The evaluated circuit (autograd graph) grows about linearly in N (~90, 230, 450 nodes).

    With the SDD library's default variable order (sdd_auto_gc=False) it is about 15x larger
    at N = 3 than at N = 1, and this check fails.
    """
    model = logic["multi_addition.pl"]
    n1 = model.query_probs([add([4], [5], 13)], digit_table)  # the circuits of STOCK_CASES
    n3 = model.query_probs([add([4, 5, 6], [7, 0, 2], 1033)], digit_table)
    graph = {1: count_autograd_nodes(n1.probs), 3: count_autograd_nodes(n3.probs)}
    assert graph[3] < 8 * graph[1]
