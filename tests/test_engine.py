"""The logic-engine contract (gedi_nesy/logic/engine.py): every engine keeps it, build_logic builds
the engine a config names, and the three engines agree on two-digit addition.

Fixed table (tests/conftest.py): image 0 is digit 1 (0.4) or 2 (0.6); image 1 is 3 or 4 (0.5
each); image 2 is 0 (0.1) or 9 (0.9); image 3 is 7 (1.0). In ``add([A1, A2], [B1, B2], S)`` the
numbers are written most significant digit first.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from deepproblog.query import Query
from problog.logic import Constant, Term, Var, list2term

from gedi_nesy.config import LogicConfig
from gedi_nesy.logic.chain import ColumnChainLogic
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.logic.engine import LogicEngine, build_logic
from gedi_nesy.logic.oracle import one_hot_query_prob

MULTI = Path(__file__).resolve().parents[1] / "programs" / "multi_addition.pl"
DIGITS = {"digit_net": 10}
KINDS = {"compiled": CompiledLogic, "deepproblog": LogicModel, "column_chain": ColumnChainLogic}
METHODS = ("query_probs", "answer_probs", "best_answers", "referenced_keys")


def img(i: int) -> Term:
    return Term("tensor", Term("img", Constant(i)))


def add(a: list[int], b: list[int], s: int | None) -> Query:
    """``add([A1, A2], [B1, B2], s)`` with A1 = img(a[0]), ... given by substitution (queries of
    one sum share a circuit in every engine); s None: the sum is a variable."""
    slots = [Term(f"p{i}") for i in range(4)]
    total = Var("S") if s is None else Constant(s)
    term = Term("add", list2term(slots[:2]), list2term(slots[2:]), total)
    return Query(term, {slot: img(i) for slot, i in zip(slots, a + b)})


SUMS = [
    (add([0, 2], [1, 3], 57), 0.05),  # d2 = 0 (0.1), d0 + d1 = 5 (0.5)
    (add([0, 2], [1, 3], 66), 0.45),  # d2 = 9 (0.9) carries 1, d0 + d1 = 5 (0.5)
    (add([0, 2], [1, 3], 76), 0.27),  # d2 = 9 (0.9), d0 + d1 = 6: 2 + 4 (0.3)
    (add([0, 2], [1, 3], 68), 0.0),  # the last digit is 7 (d2 = 0) or 6 (d2 = 9)
]
BEST = [
    (add([0, 2], [1, 3], None), 66),  # p = 0.45, as above
    (add([3, 0], [2, 1], None), 165),  # 70 + 90 (0.9) + d0 + d1 = 5 (0.5): p = 0.45
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine_circuits")


@pytest.fixture(scope="module")
def engines(cache) -> dict[str, LogicEngine]:
    """Each engine over programs/multi_addition.pl, by its ``logic.engine`` name."""
    compiled = CompiledLogic(MULTI, DIGITS, cache_dir=cache)
    return {
        "compiled": compiled,
        "deepproblog": LogicModel(MULTI, DIGITS),
        "column_chain": ColumnChainLogic(compiled),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_engine_keeps_the_protocol(engines, kind):
    engine = engines[kind]
    assert isinstance(engine, LogicEngine)
    assert engine.source == str(MULTI) and engine.networks == DIGITS
    for method in METHODS:
        ours = inspect.signature(getattr(type(engine), method)).parameters
        theirs = inspect.signature(getattr(LogicEngine, method)).parameters
        assert list(ours) == list(theirs), f"{type(engine).__name__}.{method}"


@pytest.mark.parametrize("kind", KINDS)
def test_build_logic_builds_the_engine_the_config_names(cache, kind):
    engine = build_logic(LogicConfig(engine=kind, cache_dir=str(cache)), MULTI, DIGITS)
    assert type(engine) is KINDS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_the_engines_agree_on_two_digit_sums(engines, digit_table, kind):
    engine = engines[kind]
    queries, expected = zip(*SUMS)
    probs, provable = engine.query_probs(list(queries), digit_table)
    assert probs.tolist() == pytest.approx(list(expected), abs=1e-12)
    assert provable.tolist() == [True] * len(SUMS)
    queries, expected = zip(*BEST)
    assert engine.best_answers(list(queries), digit_table) == [Constant(s) for s in expected]
    dist = engine.answer_probs(list(queries), list(range(200)), digit_table).probs.detach()
    assert [float(dist[q, s]) for q, s in enumerate(expected)] == pytest.approx([0.45, 0.45])
    assert dist.sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_the_engines_name_the_same_inputs(engines, kind):
    queries = [add([0, 2], [1, 3], 57), add([4, 5], [6, 7], 66)]
    keys = engines[kind].referenced_keys(queries)
    assert set(keys) == {"digit_net"}
    assert sorted(map(str, keys["digit_net"])) == sorted(str(img(i)) for i in range(8))


def test_the_engines_give_the_same_gradients(engines, digit_table):
    queries = [q for q, _ in SUMS[:3]]
    grads = []
    for engine in engines.values():
        probs = engine.query_probs(queries, digit_table).probs
        (grad,) = torch.autograd.grad(probs.sum(), digit_table["digit_net"].probs)
        grads.append(grad)
    assert all(torch.allclose(g, grads[0], rtol=1e-9, atol=1e-12) for g in grads[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_the_oracle_asks_any_engine(engines, kind):
    query = SUMS[0][0]  # A1 A2 + B1 B2 = 57, A = images 0, 2 and B = images 1, 3
    sure = {img(0): 1, img(2): 0, img(1): 4, img(3): 7}  # 10 + 47 = 57
    assert one_hot_query_prob(engines[kind], "digit_net", query, sure) == 1.0
    sure[img(1)] = 3  # 10 + 37 = 47
    assert one_hot_query_prob(engines[kind], "digit_net", query, sure) == 0.0


def test_logic_sdd_auto_gc_reaches_the_compiler_and_leaves_the_probabilities(cache, digit_table):
    engines = {
        auto_gc: build_logic(
            LogicConfig(engine="compiled", cache_dir=str(cache), sdd_auto_gc=auto_gc), MULTI, DIGITS
        )
        for auto_gc in (True, False)
    }
    for auto_gc, engine in engines.items():
        assert engine.sdd_auto_gc is auto_gc
        probs, _ = engine.query_probs([SUMS[1][0]], digit_table)
        assert float(probs[0]) == pytest.approx(0.45, abs=1e-12)  # d2 = 9 (0.9), d0 + d1 = 5
    assert engines[True].cache.path("t") != engines[False].cache.path("t")  # cached apart
