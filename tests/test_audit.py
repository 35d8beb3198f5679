"""The shortcut audit: the pure search on hand-counted toy cases and a brute-force cross-check,
the ProbLog-backed oracle on a small symbolic program, and the published counts through the real
programs (MNIST-EvenOdd 36 maps / 2 bijections, MNIST-Half 3 / 1)."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Hashable, Sequence

import pytest
from deepproblog.query import Query
from problog.logic import Constant, Term

from gedi_nesy.errors import ConfigError, ProgramError
from gedi_nesy.shortcuts.audit import (
    AuditResult,
    ProgramOracle,
    assignment_order,
    audit,
    audit_to_dict,
    find_concept_maps,
    format_audit,
)
from tasks import mnist_evenodd, mnist_half

# three ordered symbols; less(X, Y, yes) iff X's level is below Y's. No arithmetic.
LEVELS = """
nn(level_net, [X], Y, [low, mid, high]) :: level(X, Y).
below(low, mid). below(mid, high). below(low, high).
less(X, Y, yes) :- level(X, A), level(Y, B), below(A, B).
less(X, Y, no) :- level(X, A), level(Y, B), \\+ below(A, B).
"""
NOISY = LEVELS.replace("below(low, high).", "0.5 :: below(low, high).")


def less_query(source: str, indices: Sequence[int], label: Hashable) -> Query:
    """``less(p0, p1, label)`` with ``pI -> tensor(source(indices[I]))``."""
    names = [Term(f"p{i}") for i in range(len(indices))]
    subs = {n: Term("tensor", Term(source, Constant(i))) for n, i in zip(names, indices)}
    return Query(Term("less", *names, Term(str(label))), subs)


def summed(concepts: tuple[int, ...], label: Hashable) -> bool:
    return sum(concepts) == label


class Recorder:
    """An oracle that records its calls."""

    def __init__(self, satisfied) -> None:
        self.satisfied, self.calls = satisfied, []

    def __call__(self, concepts: tuple[int, ...], label: Hashable) -> bool:
        self.calls.append((concepts, label))
        return self.satisfied(concepts, label)


def brute_force(k: int, worlds, satisfied) -> list[tuple[int, ...]]:
    """Every map of K^K that satisfies all worlds (only for tiny K)."""
    return [
        f
        for f in itertools.product(range(k), repeat=k)
        if all(satisfied(tuple(f[d] for d in ds), y) for ds, y in worlds)
    ]


@pytest.mark.parametrize(
    ("k", "worlds", "maps", "bijections"),
    [
        (2, [((0, 1), 1)], [(0, 1), (1, 0)], [(0, 1), (1, 0)]),  # f0 + f1 = 1
        (3, [((0, 0), 0)], None, [(0, 1, 2), (0, 2, 1)]),  # f0 = 0, f1 and f2 free: 9 maps
        (2, [((0, 0), 1)], [], []),  # 2 f0 = 1 has no solution
        (
            3,
            [((0, 1, 2), 3), ((1, 1), 2)],
            [(0, 1, 2), (1, 1, 1), (2, 1, 0)],
            [(0, 1, 2), (2, 1, 0)],
        ),
    ],
)
def test_hand_counted_sums(k, worlds, maps, bijections):
    result = find_concept_maps(k, worlds, summed)
    expected = maps if maps is not None else [(0, a, b) for a in range(3) for b in range(3)]
    assert result.maps == expected and result.n_maps == len(expected)
    assert result.bijections == bijections and result.n_bijections == len(bijections)
    assert result.identity_fits == (tuple(range(k)) in expected)


def test_matches_brute_force_on_many_small_cases():
    for k, seed in itertools.product((3, 4), range(6)):
        rng = random.Random(seed)
        worlds = [
            ((rng.randrange(k), rng.randrange(k)), rng.randrange(2 * k - 1)) for _ in range(2)
        ]

        def satisfied(concepts, label, k=k):  # any relation will do
            return (concepts[0] * 2 + concepts[1]) % k == label % k

        result = find_concept_maps(k, worlds, satisfied, limit=k**k)
        expected = brute_force(k, worlds, satisfied)
        assert result.maps == expected, (k, worlds)
        assert result.n_bijections == sum(len(set(f)) == k for f in expected)


def test_prunes_and_memoises():
    impossible = Recorder(summed)
    assert find_concept_maps(4, [((0, 0), 1)], impossible).n_maps == 0
    assert impossible.calls == [((v, v), 1) for v in range(4)]  # f0 fails: no deeper search
    twice = Recorder(summed)  # the worlds (0, 1) and (1, 0) share the mapped pairs of f
    result = find_concept_maps(3, [((0, 1), 2), ((1, 0), 2), ((2, 2), 4)], twice)
    assert len(twice.calls) == len(set(twice.calls)) == result.n_checks
    assert result.maps == [(0, 2, 2), (1, 1, 2), (2, 0, 2)]


def test_limit_keeps_the_counts_complete():
    result = find_concept_maps(3, [((0, 0), 0)], summed, limit=2)
    assert (result.n_maps, len(result.maps), result.n_bijections, len(result.bijections)) == (
        9, 2, 2, 2
    )  # fmt: skip
    assert find_concept_maps(3, [((0, 0), 0)], summed, limit=0).maps == []


def test_assignment_order_completes_worlds_early():
    evenodd = [w for w, _ in mnist_evenodd.audit_spec({}).worlds]
    order = assignment_order(10, mnist_evenodd.audit_spec({}).worlds)
    assert sorted(order) == list(range(10))
    assert set(order[:2]) in [set(w) for w in evenodd]  # the 2nd assignment completes a world
    assert assignment_order(3, []) == [0, 1, 2]


@pytest.mark.parametrize(
    ("k", "worlds", "limit", "message"),
    [
        (
            3,
            [((0, 3), 1)],
            10,
            r"world \(\(0, 3\), 1\) has concept 3; allowed are the integers 0..2",
        ),
        (3, [((0, -1), 1)], 10, "has concept -1"),
        (3, [(0, 1)], 10, r"world \(0, 1\) is not of the form"),
        (0, [], 10, "domain_size = 0; it must be >= 1"),
        (3, [], -1, "limit = -1; it must be >= 0"),
    ],
)
def test_bad_input_is_one_line_config_error(k, worlds, limit, message):
    with pytest.raises(ConfigError, match=message) as info:
        find_concept_maps(k, worlds, summed, limit)
    assert "\n" not in str(info.value)


def test_program_oracle_on_a_symbolic_program():
    oracle = ProgramOracle(LEVELS, "level_net", 3, less_query)
    assert [oracle((a, b), "yes") for a, b in [(0, 1), (1, 2), (0, 2), (1, 1), (2, 0)]] == [
        True, True, True, False, False
    ]  # fmt: skip
    assert oracle((1, 1), "no") and oracle((2, 0), "no") and not oracle((0, 2), "no")


@pytest.mark.parametrize(
    ("worlds", "n_maps", "bijections"),
    [
        ([((0, 1), "yes")], 9, [(0, 1, 2), (0, 2, 1), (1, 2, 0)]),  # f0 < f1, f2 free
        ([((0, 1), "yes"), ((1, 2), "yes")], 1, [(0, 1, 2)]),  # f0 < f1 < f2
        ([((0, 1), "yes"), ((1, 0), "no"), ((2, 2), "no")], 9, [(0, 1, 2), (0, 2, 1), (1, 2, 0)]),
        ([((0, 1), "yes"), ((1, 0), "yes")], 0, []),
    ],
)
def test_audit_through_problog_counts_by_hand(worlds, n_maps, bijections):
    result = audit(LEVELS, "level_net", 3, worlds, less_query)
    assert result.n_maps == n_maps and result.bijections == bijections

    def pure(concepts, label):  # the same relation in Python: the cross-check
        return (concepts[0] < concepts[1]) == (label == "yes")

    assert result == find_concept_maps(3, worlds, pure)


def test_audit_program_errors():
    with pytest.raises(ProgramError, match="probability 0.5 with deterministic concepts"):
        audit(NOISY, "level_net", 3, [((0, 2), "yes")], less_query)
    with pytest.raises(ProgramError, match="K = 4 outputs but the domain"):
        audit(LEVELS, "level_net", 4, [((0, 2), "yes")], less_query)

    def wrong_source(source, indices, label):
        return less_query("train", indices, label)

    with pytest.raises(ProgramError, match=r"input tensor\(train\(0\)\); the query builder must"):
        audit(LEVELS, "level_net", 3, [((0, 2), "yes")], wrong_source)


@pytest.fixture(scope="module")
def published() -> dict[str, AuditResult]:
    return {
        "evenodd": audit(*mnist_evenodd.audit_spec({}), limit=100),
        "half": audit(*mnist_half.audit_spec({}), limit=100),
    }


def test_evenodd_has_36_maps_and_2_bijections(published):
    result = published["evenodd"]
    assert (result.n_maps, result.n_bijections, result.identity_fits) == (36, 2, True)
    assert result.bijections == [tuple(range(10)), tuple((d + 5) % 10 for d in range(10))]
    spec = mnist_evenodd.audit_spec({})
    assert result == find_concept_maps(10, spec.worlds, summed, limit=100)  # ProbLog == Python
    assert result.n_checks <= 3 * 10**2  # at most every (pair, label) once


def test_half_has_3_maps_and_1_bijection(published):
    result = published["half"]
    assert (result.n_maps, result.n_bijections, result.identity_fits) == (3, 1, True)
    assert result.maps == [(0, 1, 2, 3, 4), (0, 1, 3, 2, 3), (0, 1, 4, 1, 2)]  # by hand
    assert result.bijections == [(0, 1, 2, 3, 4)]


def test_format_and_dict(published):
    text = format_audit(published["half"])
    assert text.splitlines()[0] == (
        "K = 5, 7 training worlds: 3 deterministic concept maps fit (2 shortcuts), "
        "1 of them bijections; the identity fits"
    )
    assert "  0 1 2 3 4  (identity)" in text and "  0 1 4 1 2" in text
    short = format_audit(find_concept_maps(3, [((0, 0), 0)], summed, limit=2))
    assert "maps (first 2 of 9)" in short and "does NOT fit" not in short
    assert "does NOT fit" in format_audit(find_concept_maps(2, [((0, 1), 0)], summed))
    data = json.loads(json.dumps(audit_to_dict(published["evenodd"])))
    assert data["n_maps"] == 36 and data["bijections"][1] == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert len(data["maps"]) == 36 and data["identity_fits"] is True
