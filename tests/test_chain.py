"""The column-chain engine (gedi_nesy/logic/chain.py): the same probabilities, gradients and
answers as the program's own add/3 compiled in number form, hand-computed values, and its refusals.

Fixed table (tests/conftest.py): image 0 is digit 1 (0.4) or 2 (0.6); image 1 is 3 or 4 (0.5
each); image 2 is 0 (0.1) or 9 (0.9); image 3 is 7 (1.0); images 4-7 are dense.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from problog.logic import Constant, Term, list2term

from gedi_nesy.errors import DataError, ProgramError
from gedi_nesy.logic.chain import (
    ColumnChainLogic,
    chain_log_probs,
    chain_probs,
    sum_distribution,
)
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.program import ProbabilityTable

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
MULTI = (PROGRAMS / "multi_addition.pl").read_text()


def img(i: int) -> Term:
    return Term("tensor", Term("img", Constant(i)))


def add(a: list[int], b: list[int], s: int | str) -> Term:
    """``add([img(a1), ...], [img(b1), ...], s)``, most significant digit first (s a variable
    name when a string)."""
    total = Term(s) if isinstance(s, str) else Constant(s)
    return Term("add", list2term([img(i) for i in a]), list2term([img(i) for i in b]), total)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> tuple[ColumnChainLogic, CompiledLogic]:
    """(the chain, the compiled number form) over programs/multi_addition.pl, one cache."""
    cache = tmp_path_factory.mktemp("chain_circuits")
    compiled = CompiledLogic(MULTI, {"digit_net": 10}, cache_dir=cache)
    return ColumnChainLogic(compiled), compiled


def dense_table(n_images: int, seed: int) -> tuple[torch.Tensor, dict[str, ProbabilityTable]]:
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n_images, 10, generator=gen, dtype=torch.float64)  # (n, 10)
    probs = torch.softmax(logits, -1).requires_grad_()
    return probs, {"digit_net": ProbabilityTable([img(i) for i in range(n_images)], probs)}


def test_chain_and_sum_distribution_by_hand():
    # one query, 2 columns; column 0 writes its digit with carry 0 (0.3) or 1 (0.7) from carry 0
    cols = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    cols[0, 0, 0] = torch.tensor([0.3, 0.7])  # M_0[0, :]
    cols[0, 1] = torch.tensor([[0.5, 0.1], [0.2, 0.6]])  # M_1[c, c']
    assert chain_probs(cols, torch.tensor([0])).item() == pytest.approx(0.3 * 0.5 + 0.7 * 0.2)
    assert chain_probs(cols, torch.tensor([1])).item() == pytest.approx(0.3 * 0.1 + 0.7 * 0.6)
    # base 2, one column: T[c, d, c'] with carry 0 in: P(S = d + 2 c')
    cells = torch.zeros(1, 1, 2, 2, 2, dtype=torch.float64)
    cells[0, 0, 0] = torch.tensor([[0.1, 0.2], [0.3, 0.4]])  # [d, c']
    assert sum_distribution(cells)[0].tolist() == pytest.approx([0.1, 0.3, 0.2, 0.4])


def test_hand_computed_two_digit_sums(engines, digit_table):
    chain, _ = engines
    queries = [
        add([0, 2], [1, 3], 57),  # p = 0.05 = P(d2=0) * P(d0+d1=5) = 0.1*0.5
        add([0, 2], [1, 3], 66),  # p = 0.45 = P(d2=9) * P(d0+d1=5) = 0.9*0.5 (carry 1)
        add([0, 2], [1, 3], 76),  # p = 0.27 = P(d2=9) * P(d0+d1=6) = 0.9*0.3
        add([0, 2], [1, 3], 68),  # p = 0.0: the last digit is 7 (d2=0) or 6 (d2=9)
        add([0, 2], [1, 3], 200),  # p = 0.0 and no proof: above 2 * 10^2 - 1
    ]
    result = chain.query_probs(queries, digit_table)
    assert result.probs.tolist() == pytest.approx([0.05, 0.45, 0.27, 0.0, 0.0], abs=1e-12)
    assert result.provable.tolist() == [True, True, True, True, False]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_equals_the_program_in_number_form(engines, n):
    chain, compiled = engines
    probs, tables = dense_table(4 * n, seed=n)
    a, b, c = list(range(n)), list(range(n, 2 * n)), list(range(2 * n, 3 * n))
    top = 2 * 10**n
    sums = [0, 5, 10**n - 1, 10**n, top - 2, top - 1, top + 3]
    queries = [add(a, b, s) for s in sums] + [add(c, b, s) for s in (7, top // 3)]
    ours, theirs = chain.query_probs(queries, tables), compiled.query_probs(queries, tables)
    assert torch.allclose(ours.probs, theirs.probs, rtol=1e-9, atol=1e-15)
    assert ours.provable.tolist() == theirs.provable.tolist()
    assert ours.provable.tolist()[:7] == [True] * 5 + [False, False]  # top - 1: 9...9 + 9...9 + 1
    weights = torch.arange(1.0, len(queries) + 1, dtype=torch.float64)  # (Q,) distinct weights
    (g_ours,) = torch.autograd.grad((weights * ours.probs).sum(), probs)
    (g_theirs,) = torch.autograd.grad((weights * theirs.probs).sum(), probs)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-9, atol=1e-14)
    assert g_ours.abs().sum() > 0


def test_answers_equal_the_chain_of_every_sum(engines):
    # the chain's query_probs equals the program (test above); the open form must equal it on
    # every sum, in the answer order of the domain
    chain, _ = engines
    _, tables = dense_table(8, seed=5)
    pairs = [([0, 1], [2, 3]), ([4, 5], [6, 7])]
    domain = list(range(200))
    dist = chain.answer_probs([add(a, b, "S") for a, b in pairs], domain, tables)
    for q, (a, b) in enumerate(pairs):
        each = chain.query_probs([add(a, b, s) for s in domain], tables).probs  # (200,)
        assert torch.allclose(dist.probs[q], each, rtol=1e-12, atol=1e-16)
    assert dist.probs.sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    best = chain.best_answers([add(a, b, "S") for a, b in pairs], tables)
    assert best == [Constant(int(row.argmax())) for row in dist.probs]
    with pytest.raises(DataError, match="not in the answer domain"):
        chain.answer_probs([add([0, 1], [2, 3], "S")], list(range(150)), tables)


def test_best_answer_of_one_hot_four_digit_numbers(engines):
    chain, _ = engines
    digits = [1, 9, 9, 5, 8, 0, 4, 7]  # 1995 + 8047 = 10042
    probs = torch.nn.functional.one_hot(torch.tensor(digits), 10).double()  # (8, 10)
    tables = {"digit_net": ProbabilityTable([img(i) for i in range(8)], probs)}
    query = add([0, 1, 2, 3], [4, 5, 6, 7], 10042)
    assert chain.best_answers([query], tables) == [Constant(10042)]
    assert chain.query_probs([query], tables).probs.tolist() == [1.0]  # p = 1: every digit sure
    assert chain.query_probs([add([0, 1, 2, 3], [4, 5, 6, 7], 10043)], tables).probs.tolist() == [
        0.0
    ]  # p = 0: the last digit is 2


def test_refuses_other_queries_and_mixed_lengths(engines, digit_table):
    chain, _ = engines
    with pytest.raises(DataError, match=r"is not add\(As, Bs, S\)"):
        chain.query_probs([Term("digit", img(0), Constant(1))], digit_table)
    with pytest.raises(DataError, match=r"queries with \[1, 2\] digits in one call"):
        chain.query_probs([add([0], [1], 4), add([0, 2], [1, 3], 57)], digit_table)
    with pytest.raises(DataError, match="must be non-empty lists of the same length"):
        chain.query_probs([add([0, 2], [1], 4)], digit_table)
    with pytest.raises(DataError, match="needs an integer sum"):
        chain.query_probs([add([0], [1], "S")], digit_table)
    with pytest.raises(DataError, match=r"uses tensor\(img\(0\)\) in two columns"):
        chain.query_probs([add([0, 2], [1, 0], 57)], digit_table)
    # one image twice in one column is fine: the column is compiled as the program says, one
    # image one digit: 7d + 7d with d = 1 (0.4) or 2 (0.6), never 71 + 72
    same = [add([3, 0], [3, 0], 144), add([3, 0], [3, 0], 143)]
    assert chain.query_probs(same, digit_table).probs.tolist() == pytest.approx([0.6, 0.0])


def test_refuses_a_program_whose_add_is_not_the_carry_chain(tmp_path):
    # add/3 drops the carry: not column addition, so the chain would be wrong for it
    no_carry = MULTI.replace("check_columns(As, Bs, Cout, Rest)", "check_columns(As, Bs, 0, Rest)")
    assert no_carry != MULTI
    compiled = CompiledLogic(no_carry, {"digit_net": 10}, cache_dir=tmp_path)
    with pytest.raises(ProgramError, match="add/3 is not the carry chain of column/5"):
        ColumnChainLogic(compiled)
    single = CompiledLogic(PROGRAMS / "addition.pl", {"digit_net": 10}, cache_dir=tmp_path)
    with pytest.raises(ProgramError, match="cannot evaluate add/3 as a chain of column/5"):
        ColumnChainLogic(single)  # no column/5 (and no add/3) in the one-digit program


def column_terms(a: list[int], b: list[int]) -> list[Term]:
    """``column(A_j, B_j, c, d, c')`` of every column (least significant first) and cell."""
    pairs = list(zip(a[::-1], b[::-1]))
    return [
        Term("column", img(i), img(k), Constant(c), Constant(d), Constant(e))
        for i, k in pairs
        for c in (0, 1)
        for d in range(10)
        for e in (0, 1)
    ]


def slow_chain(cols: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The chain as it was: unscaled matrix products, one column at a time."""
    state = cols[:, 0, 0, :]  # (Q, 2)
    for j in range(1, cols.shape[1]):
        state = torch.einsum("qc,qcd->qd", state, cols[:, j])  # (Q, 2)
    return state.gather(1, last.view(-1, 1)).squeeze(1)  # (Q,)


def term_by_term(compiled, pairs, sums, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous evaluation: every cell a column/5 query of the compiled engine, then the
    chain for each given sum and the distribution over all sums; (P(S = sums[q]), P(S = s))."""
    n = len(pairs[0][0])
    terms = [t for a, b in pairs for t in column_terms(a, b)]
    cells = compiled.query_probs(terms, tables).probs.view(len(pairs), n, 2, 10, 2)
    digits = torch.tensor([[s // 10**j % 10 for j in range(n)] for s in sums])  # (Q, N)
    at = digits.view(len(pairs), n, 1, 1, 1).expand(-1, -1, 2, 1, 2)
    last = torch.tensor([min(s // 10**n, 1) for s in sums])
    return slow_chain(cells.gather(3, at).squeeze(3), last), sum_distribution(cells)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_batched_chain_equals_term_by_term(engines, n):
    chain, compiled = engines
    probs, tables = dense_table(3 * n, seed=10 + n)
    a, b, c = list(range(n)), list(range(n, 2 * n)), list(range(2 * n, 3 * n))
    pairs = [(a, b), (c, b), (b, c), (a, a)]  # (a, a): one image per column, both places
    sums = [5, 10**n - 1, 2 * 10**n - 2, 2 * 10**n // 3 if n > 1 else 10]
    ours = chain.query_probs([add(x, y, s) for (x, y), s in zip(pairs, sums)], tables)
    dist = chain.answer_probs([add(x, y, "S") for x, y in pairs], range(2 * 10**n), tables)
    slow, slow_dist = term_by_term(compiled, pairs, sums, tables)
    assert torch.allclose(ours.probs, slow, rtol=1e-12, atol=1e-300)
    assert torch.allclose(dist.probs, slow_dist, rtol=1e-12, atol=1e-300)
    assert slow.min() > 0 and dist.probs.sum(1).tolist() == pytest.approx([1.0] * 4, abs=1e-12)
    weights = torch.rand(len(pairs), 2 * 10**n, generator=torch.Generator().manual_seed(n),
                         dtype=torch.float64)  # fmt: skip  # (Q, S) distinct weights
    ours_total = (weights[:, 0] * ours.probs).sum() + (weights * dist.probs).sum()
    slow_total = (weights[:, 0] * slow).sum() + (weights * slow_dist).sum()
    (g_ours,) = torch.autograd.grad(ours_total, probs)
    (g_slow,) = torch.autograd.grad(slow_total, probs)
    assert torch.allclose(g_ours, g_slow, rtol=1e-12, atol=1e-15) and g_ours.abs().min() > 0
    best = chain.best_answers([add(x, y, "S") for x, y in pairs], tables)
    assert best == [Constant(int(row.argmax())) for row in slow_dist]


def test_a_column_with_a_probabilistic_fact_matches_term_by_term(tmp_path):
    # 0.9::ok. is shared by every column, so add/3 is not the chain (check=False), but each
    # column still is its circuit: P(cell) = 0.9 * P(digits)
    text = MULTI.replace(
        "column(A, B, Cin, D, Cout) :- digit", "column(A, B, Cin, D, Cout) :- ok, digit"
    )
    compiled = CompiledLogic("0.9::ok.\n" + text, {"digit_net": 10}, cache_dir=tmp_path)
    chain = ColumnChainLogic(compiled, check=False)
    probs, tables = dense_table(8, seed=3)
    pairs, sums = [([0, 1], [2, 3]), ([4, 6], [5, 6])], [57, 108]  # 6: one image, column 0
    ours = chain.query_probs([add(x, y, s) for (x, y), s in zip(pairs, sums)], tables)
    dist = chain.answer_probs([add(x, y, "S") for x, y in pairs], range(200), tables)
    slow, slow_dist = term_by_term(compiled, pairs, sums, tables)
    assert torch.allclose(ours.probs, slow, rtol=1e-12, atol=1e-300)
    assert torch.allclose(dist.probs, slow_dist, rtol=1e-12, atol=1e-300)
    assert dist.probs.sum(1).tolist() == pytest.approx([0.81, 0.81], abs=1e-12)  # 0.9 ^ 2 columns
    (g_ours,) = torch.autograd.grad(ours.probs.sum() + dist.probs[:, ::7].sum(), probs)
    (g_slow,) = torch.autograd.grad(slow.sum() + slow_dist[:, ::7].sum(), probs)
    assert torch.allclose(g_ours, g_slow, rtol=1e-12, atol=1e-15)


def test_long_chains_stay_in_range():
    # 150 columns with entries in (0, 0.2): P ~ 1e-110, below float32 (min ~1e-45), not float64
    gen = torch.Generator().manual_seed(0)
    cols = 0.2 * torch.rand(3, 150, 2, 2, generator=gen, dtype=torch.float64) + 1e-3
    last = torch.tensor([0, 1, 1])
    exact = slow_chain(cols, last)  # (3,) in float64
    assert exact.max() < 1e-80 and exact.min() > 0
    assert torch.equal(chain_probs(cols, last), exact)  # power-of-two scales: bit for bit
    assert slow_chain(cols.float(), last).tolist() == [0.0, 0.0, 0.0]  # unscaled float32 dies
    logs = chain_log_probs(cols.float(), last)  # (3,) float32, finite
    assert torch.allclose(logs.double(), exact.log(), rtol=1e-5)
    leaf = cols.clone().requires_grad_()
    (g,) = torch.autograd.grad(chain_log_probs(leaf, last).sum(), leaf)
    (g_exact,) = torch.autograd.grad(slow_chain(leaf, last).log().sum(), leaf)
    assert torch.allclose(g, g_exact, rtol=1e-10)
    ones = torch.ones(1, 150, 2, 2)  # 2^149 carry paths: unscaled float32 overflows to inf
    # log space in float32: 149 roundings of a log-sum-exp, relative error ~1e-6
    assert chain_log_probs(ones, torch.tensor([0])).item() == pytest.approx(
        149 * math.log(2), rel=1e-5
    )


def test_a_long_query_in_float32(engines):
    chain, _ = engines
    n = 130
    _, tables = dense_table(2 * n, seed=1)
    table = {
        "digit_net": ProbabilityTable(tables["digit_net"].keys, tables["digit_net"].probs.float())
    }
    query = [add(list(range(n)), list(range(n, 2 * n)), 10**n + 12345)]
    small = chain.query_probs(query, table)
    wide = chain.query_probs(query, tables)
    assert small.provable.tolist() == [True] and wide.provable.tolist() == [True]
    assert 0 < wide.probs.item() < 1e-100 and small.probs.item() == 0.0  # below float32's range


def test_log_probability_of_a_120_column_chain_below_1e_300(engines):
    # every image: digit 0 (0.002), else spread; the sum 0 needs all 240 digits 0 with no
    # carry (a carry out of a column could never be taken back), so
    # log P = 240 log 0.002 = -1491.5 (P ~ 1e-648, below even float64's 5e-324); the dead-end
    # carry-1 paths are 1e4 times likelier per column, so one scale for both carries would lose
    # carry 0 (chain_log_probs keeps one log-value per carry)
    chain, _ = engines
    n = 120
    probs = torch.full((2 * n, 10), 0.998 / 9).index_fill_(1, torch.tensor([0]), 0.002)
    probs = probs.float().requires_grad_()  # (240, 10) float32, as the trainer's tables
    tables = {"digit_net": ProbabilityTable([img(i) for i in range(2 * n)], probs)}
    query = [add(list(range(n)), list(range(n, 2 * n)), 0)]
    logs = chain.query_log_probs(query, tables)
    assert logs.provable.tolist() == [True]
    assert logs.log_probs.item() == pytest.approx(2 * n * math.log(0.002), rel=1e-6)
    assert chain.query_probs(query, tables).probs.item() == 0.0  # the probability underflows
    (grad,) = torch.autograd.grad(logs.log_probs.sum(), probs)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad[:, 0], torch.full((2 * n,), 500.0), rtol=1e-5)  # 1 / 0.002
    assert grad[:, 1:].abs().max().item() < 1e-3  # P reads only the digit-0 entries


def test_log_probabilities_of_long_random_chains_match_float64(engines):
    chain, _ = engines
    n = 120
    probs, tables = dense_table(2 * n, seed=4)  # (240, 10) float64
    small = {"digit_net": ProbabilityTable(tables["digit_net"].keys, probs.detach().float())}
    sums = [10**n + 12345, 3 * 10 ** (n - 1) + 7, 2 * 10**n - 2, 2 * 10**n]  # last: too large
    queries = [add(list(range(n)), list(range(n, 2 * n)), s) for s in sums]
    wide, narrow = chain.query_log_probs(queries, tables), chain.query_log_probs(queries, small)
    assert wide.provable.tolist() == narrow.provable.tolist() == [True, True, True, False]
    assert wide.log_probs[:3].max() < math.log(1e-100)
    assert torch.allclose(narrow.log_probs[:3].double(), wide.log_probs[:3], rtol=1e-5)
    assert wide.log_probs[3].item() == narrow.log_probs[3].item() == -math.inf
    (grad,) = torch.autograd.grad(wide.log_probs[:3].sum(), probs)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_best_answers_of_long_numbers(engines):
    # 0.9 on each image's digit: the most probable sum is the true sum, at N = 15 and 100
    chain, _ = engines
    gen = torch.Generator().manual_seed(0)
    for n in (15, 100):
        digits = torch.randint(0, 10, (2, n), generator=gen)  # most significant first
        probs = torch.full((2 * n, 10), 0.1 / 9, dtype=torch.float64)
        probs.scatter_(1, digits.view(-1, 1), 0.9)  # (2N, 10)
        tables = {"digit_net": ProbabilityTable([img(i) for i in range(2 * n)], probs)}
        truth = sum(int("".join(map(str, row.tolist()))) for row in digits)
        query = add(list(range(n)), list(range(n, 2 * n)), "S")
        assert chain.best_answers([query], tables) == [Constant(truth)]


def test_best_answer_where_every_sum_has_probability_zero(engines):
    # image 3 is 7 (1.0) but its row is zeroed: P = 0 for every sum; a provable sum is still
    # named (as the all-sums evaluation did), and None where nothing is provable
    chain, _ = engines
    probs = torch.zeros(4, 10, dtype=torch.float64)
    tables = {"digit_net": ProbabilityTable([img(i) for i in range(4)], probs)}
    (best,) = chain.best_answers([add([0, 1], [2, 3], "S")], tables)
    assert isinstance(best, Constant) and 0 <= int(best.value) <= 198


def test_referenced_keys_follow_the_column_circuits(engines):
    chain, compiled = engines
    queries = [add([3, 0], [1, 0], "S"), add([5, 2], [4, 6], 77)]
    terms = column_terms([3, 0], [1, 0]) + column_terms([5, 2], [4, 6])
    assert chain.referenced_keys(queries) == compiled.referenced_keys(terms)
    assert chain.referenced_keys([]) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(engines):
    chain, _ = engines
    probs, tables = dense_table(8, seed=7)
    leaf = probs.detach().cuda().requires_grad_()  # (8, 10) on the GPU
    gpu_tables = {"digit_net": ProbabilityTable(tables["digit_net"].keys, leaf)}
    queries = [add([0, 1], [2, 3], 57), add([4, 5], [6, 7], 120)]
    gpu, cpu = chain.query_probs(queries, gpu_tables), chain.query_probs(queries, tables)
    assert gpu.probs.device.type == "cuda"
    assert torch.allclose(gpu.probs.cpu(), cpu.probs, rtol=1e-9, atol=1e-15)
    gpu.probs.sum().backward()
    (expected,) = torch.autograd.grad(cpu.probs.sum(), probs)
    assert torch.allclose(leaf.grad.cpu(), expected, rtol=1e-9, atol=1e-14)
    assert chain.best_answers(queries, gpu_tables) == chain.best_answers(queries, tables)
