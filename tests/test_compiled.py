"""Compiled exact inference (gedi_nesy/logic/: compiled, circuit, template, batch) against
stock DeepProbLog.

Every comparison builds DeepProbLog's own model (stock Network, GraphSemiring, ``set_engine``,
``Model.solve``) on the same fixed tables and checks probabilities (to 1e-9 in float64) and
gradients w.r.t. the tables (to 1e-5 relative). Circuits are compiled into a temporary folder
shared by the module, so each template is compiled once per test session.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from deepproblog.engines import ExactEngine
from deepproblog.model import Model
from deepproblog.network import Network
from deepproblog.query import Query
from problog.logic import Constant, Term, Var, list2term

from gedi_nesy.errors import DataError, ProgramError
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.program import ProbabilityTable
from gedi_nesy.logic.template import default_cache_dir, query_template

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ROOT / "programs"
DIGITS = {"digit_net": 10}


def img(i: int) -> Term:
    return Term("tensor", Term("img", Constant(i)))


def number(images: list[int]) -> Term:
    return list2term([img(i) for i in images])


class TableNet(torch.nn.Module):
    """A stock DeepProbLog network module: image index -> its row of a fixed table."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.probs = probs  # (n, K)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.probs[int(index)]  # (K,)


class IndexSource:
    """``tensor(img(i))`` -> the index i, for the stock model."""

    def __getitem__(self, args: tuple) -> torch.Tensor:
        return torch.tensor(int(args[0]))


def stock_probs(text: str, probs: dict[str, torch.Tensor], terms: list[Term]) -> list:
    """P(term) of each query by stock DeepProbLog (a tensor, or a float for a constant)."""
    networks = [Network(TableNet(p), name) for name, p in probs.items()]
    model = Model(text, networks, load=False)
    model.set_engine(ExactEngine(model))
    model.add_tensor_source("img", IndexSource())
    results = model.solve([Query(t) for t in terms])
    return [r.result.get(t, 0.0) for r, t in zip(results, terms)]


def dense_tables(sizes: dict[str, int], n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded softmax tables, (n, K) float64 per network."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.softmax(2 * torch.randn(n, k, generator=gen, dtype=torch.float64), -1)
        for name, k in sizes.items()
    }


def lookup(probs: dict[str, torch.Tensor]) -> dict[str, ProbabilityTable]:
    return {name: ProbabilityTable([img(i) for i in range(len(p))], p) for name, p in probs.items()}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., CompiledLogic]:
    """``compiled(text, networks)``: one engine per program, sharing one temporary cache."""
    folder = tmp_path_factory.mktemp("compiled")
    made: dict[str, CompiledLogic] = {}

    def make(text: str, networks: dict[str, int] = DIGITS) -> CompiledLogic:
        if text not in made:
            made[text] = CompiledLogic(text, networks, cache_dir=folder)
        return made[text]

    return make


def assert_matches_stock(logic: CompiledLogic, text: str, probs: dict, terms: list[Term]) -> None:
    """Same probabilities (1e-9) and table gradients (1e-5 relative) as stock DeepProbLog."""
    stock_leaves = {k: p.clone().requires_grad_() for k, p in probs.items()}
    ours_leaves = {k: p.clone().requires_grad_() for k, p in probs.items()}
    expected = stock_probs(text, stock_leaves, terms)
    got = logic.query_probs(terms, lookup(ours_leaves)).probs  # (Q,)
    assert got.tolist() == pytest.approx([float(p) for p in expected], abs=1e-9, rel=0)
    weights = torch.arange(1.0, len(terms) + 1, dtype=torch.float64)  # (Q,) distinct weights
    stock_total = sum(w * p for w, p in zip(weights, expected))
    assert isinstance(stock_total, torch.Tensor), "no query depends on the tables"
    stock_total.backward()
    (weights * got).sum().backward()
    for name in probs:
        stock_grad = stock_leaves[name].grad
        ours_grad = ours_leaves[name].grad
        if stock_grad is None:
            assert ours_grad is None or not ours_grad.any(), name
            continue
        assert torch.allclose(ours_grad, stock_grad, rtol=1e-5, atol=1e-12), name
    assert any(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in ours_leaves.values())


# --------------------------------------------------------------------------- templates


def test_template_numbers_distinct_tensors_in_order():
    term = Term("f", img(7), Term("g", img(3), img(7)), Constant(5))
    template, slots = query_template(term)
    assert str(template) == "f(tensor(gedi_slot(0)),g(tensor(gedi_slot(1)),tensor(gedi_slot(0))),5)"
    assert slots == [img(7), img(3)]


def test_queries_share_a_template_only_when_equal(compiled):
    logic = compiled((PROGRAMS / "addition.pl").read_text(), DIGITS)
    same = [
        Term("addition", img(0), img(1), Constant(7)),
        Term("addition", img(4), img(2), Constant(7)),
    ]
    assert logic.prepare(same) == 1
    a, b = Term("a"), Term("b")
    substituted = Query(Term("addition", a, b, Constant(7)), {a: img(5), b: img(6)})
    assert logic.prepare([*same, substituted]) == 1
    different = [
        Term("addition", img(0), img(0), Constant(7)),  # one image twice: its own template
        Term("addition", img(0), img(1), Constant(7.0)),  # 7.0 is not 7 in Prolog
    ]
    assert logic.prepare([*same, *different]) == 3


# --------------------------------------------------------------------------- against stock


MULTI = (PROGRAMS / "multi_addition.pl").read_text()
STOCK_CASES = {
    "addition": (
        (PROGRAMS / "addition.pl").read_text(),
        DIGITS,
        [
            Term("addition", img(4), img(5), Constant(9)),
            Term("addition", img(4), img(4), Constant(8)),  # one image twice
            Term("addition", img(0), img(6), Constant(11)),  # sparse row 0 (digits 1, 2)
            Term("addition", img(4), img(5), Constant(19)),  # no proof
        ],
    ),
    "multi_n1": (MULTI, DIGITS, [Term("add", number([4]), number([5]), Constant(13))]),
    "multi_n2": (
        MULTI,
        DIGITS,
        [
            Term("add", number([4, 5]), number([6, 7]), Constant(97)),
            Term("add", number([4, 4]), number([1, 7]), Constant(57)),
        ],
    ),
    "multi_n3": (
        MULTI,
        DIGITS,
        [Term("add", number([4, 5, 6]), number([7, 0, 2]), Constant(1033))],
    ),
    "negation_fact_two_networks": (
        """
        nn(digit_net, [X], Y, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]) :: digit(X, Y).
        nn(coin_net, [X], C, [heads, tails, edge]) :: coin(X, C).
        0.3::bias.
        big(X) :- digit(X, D), D > 5.
        odd(X) :- digit(X, D), D mod 2 =:= 1.
        win(X, Y) :- big(X), \\+ odd(Y), coin(Y, heads).
        win(X, Y) :- bias, coin(X, tails).
        lose(X) :- \\+ win(X, X).
        never(X) :- digit(X, D), D > 9.
        """,
        {"digit_net": 10, "coin_net": 3},
        [
            Term("win", img(4), img(5)),
            Term("win", img(6), img(6)),
            Term("lose", img(7)),
            Term("never", img(4)),  # no proof
            Term("bias"),  # the probabilistic fact alone: constant 0.3
        ],
    ),
}


@pytest.mark.parametrize("case", list(STOCK_CASES))
def test_matches_stock_deepproblog(case, compiled, digit_probs):
    text, networks, terms = STOCK_CASES[case]
    probs = dense_tables(networks)
    probs["digit_net"] = digit_probs.detach()  # rows 0-3 sparse (exact zeros), 4-7 dense
    assert_matches_stock(compiled(text, networks), text, probs, terms)


def random_program(seed: int) -> str:
    """A stratified program over two neural ADs, two facts and four derived predicates."""
    rng = random.Random(seed)
    lines = [
        "nn(net_a, [X], Y, [0, 1, 2]) :: a(X, Y).",
        "nn(net_b, [X], Y, [x, y]) :: b(X, Y).",
        f"{rng.uniform(0.1, 0.9):.3f}::f0.",
        f"{rng.uniform(0.1, 0.9):.3f}::f1.",
    ]

    def literal(i: int) -> str:
        v, w = rng.sample(["X", "Y"], 2)
        options = [
            f"a({v}, {rng.randrange(3)})",
            f"b({v}, {rng.choice('xy')})",
            f"f{rng.randrange(2)}",
        ]
        options += [f"p{j}({v}, {w})" for j in range(i)]
        atom = rng.choice(options)
        return f"\\+ {atom}" if rng.random() < 0.3 else atom

    for i in range(4):
        for _ in range(rng.randint(1, 3)):
            body = ", ".join(literal(i) for _ in range(rng.randint(1, 3)))
            lines.append(f"p{i}(X, Y) :- {body}.")
    return "\n".join(lines)


@pytest.mark.parametrize("seed", range(5))
def test_random_programs_match_stock_deepproblog(seed, compiled):
    text = random_program(seed)
    networks = {"net_a": 3, "net_b": 2}
    pairs = [(0, 1), (1, 0), (2, 2), (3, 4)]  # (2, 2): one input in both arguments
    terms = [Term(f"p{i}", img(x), img(y)) for i in (1, 2, 3) for x, y in pairs]
    probs = dense_tables(networks, seed=seed)
    assert_matches_stock(compiled(text, networks), text, probs, terms)


def test_answers_match_stock_deepproblog(compiled, digit_probs):
    text = (PROGRAMS / "addition.pl").read_text()
    logic = compiled(text)
    probs = digit_probs.detach()
    queries = [
        Query(Term("addition", img(4), img(5), Constant(0))),  # the sum is replaced
        Query(Term("addition", img(0), img(1), Constant(0))),  # sparse rows: {1, 2} + {3, 4}
    ]
    open_terms = [q.variable_output().query for q in queries]
    model = Model(text, [Network(TableNet(probs), "digit_net")], load=False)
    model.set_engine(ExactEngine(model))
    model.add_tensor_source("img", IndexSource())
    stock = [r.result for r in model.solve([Query(t) for t in open_terms])]
    tables = lookup({"digit_net": probs})
    dist = logic.answer_probs(queries, list(range(19)), tables)
    for row, expected in zip(dist.probs, stock):
        want = np.zeros(19)
        for answer, p in expected.items():
            want[int(answer.args[2])] = float(p)
        assert row.tolist() == pytest.approx(want.tolist(), abs=1e-9)
    assert dist.provable.tolist() == [True, True]
    answers = logic.answers(queries, tables)
    assert [list(a) for a in answers] == [[t.args[2] for t in e] for e in stock]
    best = logic.best_answers(queries, tables)
    assert best == [max(e, key=lambda t: float(e[t])).args[2] for e in stock]
    assert best[1] == Constant(5)  # 1+4 and 2+3: 0.4*0.5 + 0.6*0.5 = 0.5


def test_open_answers_sum_to_one_and_agree_with_ground_queries(compiled):
    logic = compiled(MULTI)  # the var(S) branch of add/3
    digits = [3, 9]  # 3 + 9 = 12
    smooth = 0.9 * torch.nn.functional.one_hot(torch.tensor(digits), 10).double() + 0.01  # (2, 10)
    tables = lookup({"digit_net": smooth})
    query = Query(Term("add", number([0]), number([1]), Constant(0)))
    dist = logic.answer_probs([query], list(range(19)), tables).probs  # (1, 19)
    assert dist.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert logic.best_answers([query], tables) == [Constant(12)]
    ground = [Term("add", number([0]), number([1]), Constant(s)) for s in (12, 5)]
    probs = logic.query_probs(ground, tables).probs  # the check_columns branch of add/3
    assert probs.tolist() == pytest.approx([dist[0, 12].item(), dist[0, 5].item()], abs=1e-12)


# --------------------------------------------------------------------------- batching, edge cases


def test_batched_equals_one_by_one(compiled):
    text, networks, _ = STOCK_CASES["negation_fact_two_networks"]
    logic = compiled(text, networks)
    tables = lookup(dense_tables(networks, seed=3))
    terms = [
        Term("win", img(4), img(5)),
        Term("never", img(0)),
        Term("lose", img(1)),
        Term("win", img(2), img(3)),
        Term("lose", img(5)),
        Term("win", img(5), img(5)),
    ]
    batched = logic.query_probs(terms, tables)
    single = [logic.query_probs([t], tables) for t in terms]
    assert batched.probs.tolist() == pytest.approx([s.probs.item() for s in single], abs=1e-15)
    assert batched.provable.tolist() == [True, False, True, True, True, True]
    assert batched.n_unprovable == 1
    assert batched.probs[1].item() == 0.0


def test_float32_tables_agree_with_float64(compiled):
    logic = compiled(MULTI)
    gen = torch.Generator().manual_seed(1)
    p64 = torch.softmax(4 * torch.randn(8, 10, generator=gen, dtype=torch.float64), -1)
    terms = [Term("add", number([0, 1, 2]), number([3, 4, 5]), Constant(s)) for s in (1033, 0, 1)]
    r64 = logic.query_probs(terms, lookup({"digit_net": p64})).probs
    r32 = logic.query_probs(terms, lookup({"digit_net": p64.float()})).probs
    assert r32.dtype == torch.float32 and r64.dtype == torch.float64
    assert r64.min() > 0
    assert torch.allclose(r32.double(), r64, rtol=1e-5, atol=0)


def test_errors_say_what_to_fix(compiled, digit_probs, tmp_path):
    text = (PROGRAMS / "addition.pl").read_text()
    logic = compiled(text)
    tables = lookup({"digit_net": digit_probs.detach()})
    with pytest.raises(DataError, match="no row for tensor\\(img\\(99\\)\\)"):
        logic.query_probs([Term("addition", img(99), img(1), Constant(3))], tables)
    with pytest.raises(DataError, match="free variables"):
        logic.query_probs([Term("addition", img(0), img(1), Var("Z"))], tables)
    with pytest.raises(DataError, match="registered networks"):
        logic.query_probs(
            [Term("addition", img(0), img(1), Constant(3))], {"other": tables["digit_net"]}
        )
    with pytest.raises(ProgramError, match="<program>:1: .* mixes t\\(...\\) and fixed"):
        CompiledLogic("t(0.5)::f; 0.5::g.\n" + text, DIGITS, cache_dir=tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(compiled, digit_probs):
    logic = compiled(MULTI)
    terms = [Term("add", number([4, 5]), number([6, 7]), Constant(s)) for s in (97, 57, 198)]
    cpu = logic.query_probs(terms, lookup({"digit_net": digit_probs.detach()})).probs
    leaf = digit_probs.detach().cuda().requires_grad_()
    gpu = logic.query_probs(terms, lookup({"digit_net": leaf})).probs
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-12)
    gpu.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


# --------------------------------------------------------------------------- disk cache


def test_default_cache_dir_follows_xdg():
    assert default_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/gedi_nesy/compiled")
    assert default_cache_dir({}) == Path.home() / ".cache" / "gedi_nesy" / "compiled"


CHILD = """
import json, sys
from pathlib import Path
import torch
from problog.logic import Constant, Term
from gedi_nesy.logic.program import ProbabilityTable
from gedi_nesy.logic.compiled import CompiledLogic

img = lambda i: Term("tensor", Term("img", Constant(i)))
logic = CompiledLogic(Path(sys.argv[1]), {"digit_net": 10}, cache_dir=sys.argv[2])
probs = torch.softmax(torch.arange(20, dtype=torch.float64).view(2, 10).sin(), -1)
table = {"digit_net": ProbabilityTable([img(0), img(1)], probs)}
p = logic.query_probs([Term("addition", img(0), img(1), Constant(9))], table).probs
print(json.dumps({"stats": logic.stats, "p": p.item()}))
"""


def run_child(program: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", CHILD, str(program), str(cache)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cache_survives_a_new_process_and_misses_on_an_edit(tmp_path):
    program = tmp_path / "addition.pl"
    program.write_text((PROGRAMS / "addition.pl").read_text())
    cache = tmp_path / "cache"
    query = [Term("addition", img(0), img(1), Constant(9))]
    first = CompiledLogic(program, DIGITS, cache_dir=cache)
    first.prepare(query)
    assert first.stats["compiled"] == 1
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))
    child = run_child(program, cache)
    assert child["stats"] == {"memory_hits": 0, "disk_hits": 1, "compiled": 0}
    assert child["p"] > 0
    edited = program.read_text() + "\n% an edit changes the key\n"
    logic = CompiledLogic(edited, DIGITS, cache_dir=cache)
    logic.prepare(query)
    assert logic.stats["compiled"] == 1 and len(list(cache.glob("*.npz"))) == 2


def test_corrupt_cache_file_is_a_miss_and_is_rewritten(tmp_path, digit_probs):
    text = (PROGRAMS / "addition.pl").read_text()
    query = [Term("addition", img(4), img(5), Constant(9))]
    tables = lookup({"digit_net": digit_probs.detach()})
    fresh = CompiledLogic(text, DIGITS, cache_dir=tmp_path)
    expected = fresh.query_probs(query, tables).probs
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])  # a partial write
    again = CompiledLogic(text, DIGITS, cache_dir=tmp_path)
    assert torch.equal(again.query_probs(query, tables).probs, expected)
    assert again.stats["compiled"] == 1
    third = CompiledLogic(text, DIGITS, cache_dir=tmp_path)
    third.prepare(query)
    assert third.stats == {"memory_hits": 0, "disk_hits": 1, "compiled": 0}
