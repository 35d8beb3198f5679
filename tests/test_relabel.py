"""Logic-guided relabelling: the branch-and-bound search on hand-built groups, the program oracle
and the search on real queries of programs/addition.pl, and the trainer step that renames a
network's concept values."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from deepproblog.query import Query
from problog.logic import Constant, Term

from gedi_nesy.config import GediConfig, JointConfig, OptimConfig
from gedi_nesy.errors import ConfigError, DataError
from gedi_nesy.gedi.nets import pool_values
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.oracle import one_hot_query_prob
from gedi_nesy.shortcuts.relabel import (
    Relabelling,
    best_cluster_map,
    best_permutation,
    find_relabelling,
)
from gedi_nesy.train.joint import JointTrainer
from gedi_nesy.train.loop import FitRecord
from gedi_nesy.train.run import Relabeller, relabel_due

ROOT = Path(__file__).resolve().parents[1]
ADDITION = ROOT / "programs/addition.pl"


def _sum_groups(pairs_sums_counts):
    """Groups ((a, b), count) with a score that proves sum s when pi(a) + pi(b) == s."""
    groups = [((a, b), float(n)) for a, b, _, n in pairs_sums_counts]
    sums = [s for _, _, s, _ in pairs_sums_counts]

    def score(g, mapped):
        return 1.0 if mapped[0] + mapped[1] == sums[g] else 0.0

    return groups, score


def _random_sum_groups(gen, n_rows, n_units, k):
    """``n_rows`` random ((a, b), count) groups over ``n_units`` units, each asking a sum < 2k-1."""
    rows = []
    for _ in range(n_rows):
        a, b = torch.randint(n_units, (2,), generator=gen).tolist()
        s = int(torch.randint(2 * k - 1, (1,), generator=gen))
        rows.append((a, b, s, int(torch.randint(1, 9, (1,), generator=gen))))
    return _sum_groups(rows)


def _weighted_score(groups, score, f):
    """``sum_g w_g * score(g, f(units_g))``: what the searches maximise."""
    return sum(w * score(g, tuple(f[c] for c in units)) for g, (units, w) in enumerate(groups))


def _brute_force(k, groups, score):
    return max(_weighted_score(groups, score, p) for p in itertools.permutations(range(k)))


def test_a_swapped_labelling_is_undone():
    # true values: cluster 0 is 0, cluster 1 is 2, cluster 2 is 1 (clusters 1 and 2 swapped)
    groups, score = _sum_groups([(0, 1, 2, 5), (0, 2, 1, 4), (1, 2, 3, 3), (2, 2, 2, 2)])
    found = best_permutation(3, groups, score)
    assert found.mapping == (0, 2, 1)
    assert found.value == 14.0 and found.total == 14.0  # every query proved after the swap
    assert found.current_value == 3.0  # before: only (1, 2) -> 3 is proved, 3 queries
    assert found.complete


def test_identity_kept_when_nothing_proves_more():
    groups, score = _sum_groups([(0, 1, 1, 3), (1, 1, 2, 1)])
    found = best_permutation(3, groups, score)
    assert found.mapping == (0, 1, 2) and found.value == found.current_value == 4.0


@pytest.mark.parametrize("seed", range(5))
def test_branch_and_bound_equals_brute_force_on_noisy_groups(seed):
    gen = torch.Generator().manual_seed(seed)
    k = 5
    groups, score = _random_sum_groups(gen, 12, k, k)
    found = best_permutation(k, groups, score)
    assert found.complete and found.value == _brute_force(k, groups, score)
    assert found.value >= found.current_value
    assert _weighted_score(groups, score, found.mapping) == found.value


def test_budget_stops_the_search_and_says_so():
    groups, score = _sum_groups([(a, b, (a + b + 3) % 9, 1) for a in range(5) for b in range(5)])
    found = best_permutation(5, groups, score, max_nodes=3)
    assert not found.complete and found.nodes == 3
    assert found.value >= found.current_value


@pytest.mark.parametrize(
    "k, groups, nodes, match",
    [(0, [], 10, "k = 0"), (3, [((0, 3), 1.0)], 10, r"0\.\.2"), (3, [((0,), -1.0)], 10, "weight"),
     (3, [], 0, "max_nodes = 0")],
)  # fmt: skip
def test_bad_input_is_a_one_line_error(k, groups, nodes, match):
    with pytest.raises(ConfigError, match=match):
        best_permutation(k, groups, lambda g, m: 1.0, max_nodes=nodes)


# MNIST-Half's training worlds (digits 0-4): ((a, b), sum, queries); every digit has a cluster
HALF = [((0, 0), 0, 4), ((0, 1), 1, 2), ((1, 0), 1, 2), ((2, 3), 5, 3), ((3, 2), 5, 3),
        ((2, 4), 6, 2), ((4, 2), 6, 2)]  # fmt: skip


def _half_groups(cluster_of_digit):
    rows = [(cluster_of_digit[a], cluster_of_digit[b], s, n) for (a, b), s, n in HALF]
    groups, score = _sum_groups(rows)
    usage = [0.0] * 6
    for (a, b), _, n in HALF:
        usage[cluster_of_digit[a]] += n
        usage[cluster_of_digit[b]] += n
    return groups, score, usage


def test_a_merge_of_two_digits_is_undone_when_they_sit_in_different_clusters():
    # digit d in cluster d; cluster 5 is empty. The current map is Half's shortcut 0 1 3 2 3
    # (2 and 4 both called 3, 3 called 2), which proves every sum, as the identity does
    groups, score, usage = _half_groups([0, 1, 2, 3, 4])
    shortcut = (0, 1, 3, 2, 3, 4)
    found = best_cluster_map(5, shortcut, groups, score, usage)
    assert found.current_value == found.total == 18.0  # 3 + 3 = 6 and 2 + 3 = 5: all proved
    assert found.current_min_usage == 0.0  # value 4 is predicted for no image
    assert found.mapping == (0, 1, 2, 3, 4, 4) and found.value == 18.0  # the identity
    assert found.min_usage == 4.0  # images called 4 (the 2 + 2 in the (2, 4) worlds)
    assert found.complete
    # without the usage floor the logic alone cannot tell the two maps apart: ties keep the current
    assert best_cluster_map(5, shortcut, groups, score, usage, min_share=0.0).mapping == shortcut


def test_a_search_stopped_by_its_budget_still_meets_the_floor_by_the_greedy_ascent():
    # one node is no search: the map comes from the ascent alone. From the shortcut (value 4
    # unused) moving cluster 2 to value 4 meets the floor; further moves stop at 1 -> 3, 2 -> 4,
    # 3 -> 1, 4 -> 2, which proves every sum but the four 0 + 1 = 1 queries (14 of 18)
    groups, score, usage = _half_groups([0, 1, 2, 3, 4])
    found = best_cluster_map(5, (0, 1, 3, 2, 3, 4), groups, score, usage, max_nodes=1)
    assert not found.complete and found.nodes == 1
    assert found.mapping == (0, 3, 4, 1, 2, 4) and found.value == 14.0
    assert found.current_min_usage == 0.0 and found.min_usage == 4.0  # floor 0.5 * 36 / 5 = 3.6
    assert _weighted_score(groups, score, found.mapping) == found.value


def _brute_force_map(k, current, groups, score, usage, floor):
    best = None
    for f in itertools.product(range(k), repeat=len(current)):
        counts = [sum(u for c, u in enumerate(usage) if f[c] == v) for v in range(k)]
        if 0 in [f.count(v) for v in range(k)] or min(counts) < floor:
            continue
        value = _weighted_score(groups, score, f)
        best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_cluster_map_search_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    k, m = 3, 5
    groups, score = _random_sum_groups(gen, 10, m, k)
    usage = torch.randint(0, 20, (m,), generator=gen).float().tolist()
    current = (0, 1, 2, 0, 1)
    share = [0.0, 0.5, 0.9][seed % 3]
    found = best_cluster_map(k, current, groups, score, usage, min_share=share)
    floor = share * sum(usage) / k
    expected = _brute_force_map(k, current, groups, score, usage, floor)
    if expected is None:  # no map meets the floor: the best of all maps
        expected = _brute_force_map(k, current, groups, score, usage, 0.0)
    assert found.complete and found.value == expected
    assert sorted(set(found.mapping)) == list(range(k))  # every value has a cluster
    assert _weighted_score(groups, score, found.mapping) == found.value


@pytest.mark.parametrize(
    "current, usage, share, match",
    [((0, 1), [1.0, 1.0], 0.5, ">= k = 3 clusters"), ((0, 1, 3), [1.0] * 3, 0.5, r"0\.\.2"),
     ((0, 1, 2), [1.0, 1.0], 0.5, "one usage"), ((0, 1, 2), [1.0, -1.0, 1.0], 0.5, "usage >= 0"),
     ((0, 1, 2), [1.0] * 3, 1.5, r"relabel_min_share = 1.5; it must be in \[0, 1\]")],
)  # fmt: skip
def test_bad_cluster_map_input_is_a_one_line_error(current, usage, share, match):
    with pytest.raises(ConfigError, match=match):
        best_cluster_map(3, current, [], lambda g, m: 1.0, usage, min_share=share)


def _img(i):
    return Term("tensor", Term("img", Constant(i)))


SLIP = ADDITION.read_text() + "0.3::slip.\nslipped(X, Y, Z) :- addition(X, Y, Z), slip.\n"


def test_the_oracle_asks_the_program_with_inputs_known_for_sure():
    logic = CompiledLogic(ADDITION, {"digit_net": 10})
    query = _query(0, 1, 5)
    assert one_hot_query_prob(logic, "digit_net", query, {_img(0): 2, _img(1): 3}) == 1.0
    assert one_hot_query_prob(logic, "digit_net", query, {_img(0): 2, _img(1): 4}) == 0.0
    slipped = Query(Term("slipped", _img(0), _img(1), Constant(5)))
    p = one_hot_query_prob(CompiledLogic(SLIP, {"digit_net": 10}), "digit_net", slipped,
                           {_img(0): 1, _img(1): 4})  # fmt: skip
    assert p == pytest.approx(0.3, abs=1e-15)  # p = 0.3: the sum holds, the slip is a fact
    with pytest.raises(DataError, match="network 'sign_net' is not one of"):
        one_hot_query_prob(logic, "sign_net", query, {_img(0): 2})
    with pytest.raises(DataError, match=r"each must be in 0\.\.9"):
        one_hot_query_prob(logic, "digit_net", query, {_img(0): 2, _img(1): 10})


DIGITS = list(range(10)) * 2  # image i shows digit i % 10
PAIRS = [(i, j) for i in range(20) for j in range(20) if (i * 7 + j) % 5 == 0]


def test_the_relabelling_names_units_from_the_queries_and_the_program_alone():
    logic = CompiledLogic(ADDITION, {"digit_net": 10})
    queries = [_query(i, j, DIGITS[i] + DIGITS[j]) for i, j in PAIRS]
    wrong = [0, 1, 6, 3, 8, 5, 2, 7, 4, 9]  # the unit of digit d: 2<->6, 4<->8
    unit_of = {_img(i): wrong[d] for i, d in enumerate(DIGITS)}
    found = find_relabelling(logic, "digit_net", unit_of, queries, 10)
    assert found.value == found.total == len(queries) > found.current_value
    assert [found.mapping[wrong[d]] for d in range(10)] == list(range(10))
    # 20 clusters: image i of digit d sits in cluster d (i < 10) or 10 + d; cluster 9 is called 8
    unit_of = {_img(i): d + 10 * (i >= 10) for i, d in enumerate(DIGITS)}
    current = [0, 1, 2, 3, 4, 5, 6, 7, 8, 8] + list(range(10))
    found = find_relabelling(logic, "digit_net", unit_of, queries, 10, current=current)
    assert found.mapping == tuple(range(10)) * 2 and found.value == found.total
    assert found.current_min_usage == 1.0 and found.min_usage == 2.0  # images called 9


class _LabelNet(torch.nn.Module):
    """Reads the digit written in pixel (0, 0) and scores it through a linear ``head`` (a
    RelabelNet with one cluster per value)."""

    def __init__(self, wrong_names: list[int]) -> None:
        super().__init__()
        self.k, self.value_of_cluster = 10, None
        self.head = torch.nn.Linear(10, 10, bias=False)
        with torch.no_grad():  # row wrong_names[d] fires for digit d: digit d is called that
            self.head.weight.zero_()
            for d, name in enumerate(wrong_names):
                self.head.weight[name, d] = 10.0

    def forward(self, x):
        onehot = torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()  # (B, 10)
        return self.head(onehot)  # (B, 10)

    def cluster_logits(self, x):
        return self(x)  # (B, 10)


def _query(a, b, s):
    subs = {Term("p0"): Term("tensor", Term("img", Constant(a))),
            Term("p1"): Term("tensor", Term("img", Constant(b)))}  # fmt: skip
    return Query(Term("addition", Term("p0"), Term("p1"), Constant(s)), subs)


def _addition_trainer(net, images, digits):
    """A logic-only trainer on programs/addition.pl and 80 sums of the 20 images."""
    cfg = JointConfig(GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0),
                      optim=OptimConfig(relabel_every=1))  # fmt: skip
    trainer = JointTrainer(
        CompiledLogic(ADDITION, {"digit_net": 10}), {"digit_net": net}, {"img": images}, cfg,
        device="cpu",
    )  # fmt: skip
    pairs = [(i, j) for i in range(20) for j in range(20) if (i * 7 + j) % 5 == 0]
    return trainer, [_query(i, j, digits[i] + digits[j]) for i, j in pairs]


def test_trainer_relabels_a_network_that_names_digits_wrongly():
    digits = list(range(10)) * 2  # image i shows digit i % 10
    images = torch.zeros(20, 1, 28, 28)
    images[:, 0, 0, 0] = torch.tensor(digits, dtype=torch.float32)
    wrong = [0, 1, 6, 3, 8, 5, 2, 7, 4, 9]  # the EvenOdd local optimum: 2<->6, 4<->8
    net = _LabelNet(wrong)
    trainer, queries = _addition_trainer(net, images, digits)
    trainer.train_step(queries[:8])  # gives Adam a state to move with the rows
    moment = trainer.optimizer.state[net.head.weight]["exp_avg"].clone()  # (10, 10)
    found = trainer.relabel(queries)
    assert found.current_value < found.total  # the wrong names fail some sums
    assert found.value == found.total == len(queries)  # after renaming, every sum is proved
    predicted = trainer.concept_probs("digit_net", images).argmax(-1).tolist()
    assert predicted == digits  # the head's rows moved: the network now names digits right
    moved = trainer.optimizer.state[net.head.weight]["exp_avg"]
    assert all(torch.equal(moved[found.mapping[c]], moment[c]) for c in range(10))
    assert trainer.relabel(queries).mapping == tuple(range(10))  # a second pass changes nothing


def _no_head() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))


def test_relabel_every_needs_one_network_with_a_head():
    optim = OptimConfig(relabel_every=5)
    cfg = JointConfig(GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0), optim=optim)
    trainer = JointTrainer(
        CompiledLogic(ADDITION, {"digit_net": 10}), {"digit_net": _no_head()},
        {"img": torch.zeros(2, 1, 28, 28)}, cfg, device="cpu",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="optim.relabel_every = 5"):
        Relabeller(trainer, [], optim)  # the joint run builds it before the first step


def test_a_bad_usage_floor_is_refused_before_training():
    with pytest.raises(ConfigError, match=r"relabel_min_share = -0.1; it must be .*in \[0, 1\]"):
        OptimConfig(relabel_min_share=-0.1)


def test_relabelling_runs_after_the_warm_up_and_never_after_the_last_step():
    o = OptimConfig(relabel_every=100, gedi_only_steps=150)
    due = [step for step in range(1, 1051) if relabel_due(o, step, 1050)]
    assert due == list(range(250, 1050, 100))
    assert not any(relabel_due(OptimConfig(), step, 1050) for step in range(1, 1051))


class _ScriptedTrainer:
    """A trainer whose validation accuracies and relabellings are given in advance."""

    def __init__(self, accuracies, relabellings):
        self.net = torch.nn.Linear(1, 1, bias=False)
        self.nets = {"digit_net": self.net}
        self.accuracies, self.relabellings = iter(accuracies), iter(relabellings)

    def task_accuracy(self, queries):
        return next(self.accuracies)

    def relabel(self, queries):
        return next(self.relabellings)

    def _relabel_head(self):
        return self.net


def _relabelling(mapping):
    return Relabelling(mapping, (0, 1, 2), 9.0, 6.0, 10.0, 4, True)


def test_a_change_of_names_forgets_the_best_validation_state_kept_before_it():
    trainer = _ScriptedTrainer([0.9, 0.8, 0.7, 0.6], [_relabelling((0, 1, 2)),
                                                     _relabelling((1, 0, 2))])  # fmt: skip
    record, hook = FitRecord(), Relabeller(trainer, ["a sum"], OptimConfig(relabel_every=1))

    def validate():
        return record.observe(trainer.task_accuracy(["a sum"]), trainer.nets, patience=0)

    for weight in (1.0, 2.0):
        trainer.net.weight.data.fill_(weight)
        validate()
    assert record.best_val == 0.9 and float(record.best_nets["digit_net"]["weight"]) == 1.0
    same = hook(1, 10, record)  # the names stay: the record stays
    assert "relabel_map" not in same and record.best_val == 0.9 and hook.relabels == 0
    renamed = hook(2, 10, record)
    assert renamed["relabel_map"] == [1, 0, 2] and renamed["relabel_proved_after"] == 0.9
    assert hook.relabels == 1 and record.best_val == -1.0 and record.best_nets is None
    for weight in (3.0, 4.0):  # 0.7 then 0.6: the best since the renaming is the first
        trainer.net.weight.data.fill_(weight)
        validate()
    assert record.best_val == 0.7 and float(record.best_nets["digit_net"]["weight"]) == 3.0
    assert hook(10, 10, record) == {}  # never after the last step


class _ClusterNet(torch.nn.Module):
    """20 clusters for 10 values: image i of digit d sits in cluster d (i < 10) or 10 + d."""

    def __init__(self, value_of_cluster: list[int]) -> None:
        super().__init__()
        self.k, self.n_clusters = 10, 20
        self.head = torch.nn.Linear(20, 20, bias=False)
        self.register_buffer("value_of_cluster", torch.tensor(value_of_cluster))

    def cluster_logits(self, x):
        return 10.0 * torch.nn.functional.one_hot(x[:, 0, 0, 1].long(), 20).float()  # (B, 20)

    def forward(self, x):
        return pool_values(self.cluster_logits(x), self.value_of_cluster, self.k)  # (B, 10)


def test_trainer_reassigns_the_clusters_of_an_overclustered_network():
    digits = list(range(10)) * 2
    images = torch.zeros(20, 1, 28, 28)
    images[:, 0, 0, 1] = torch.tensor([d + 10 * (i >= 10) for i, d in enumerate(digits)],
                                      dtype=torch.float32)  # fmt: skip
    wrong = [0, 1, 2, 3, 4, 5, 6, 7, 8, 8] + list(range(10))  # cluster 9 (image 9, a 9) called 8
    net = _ClusterNet(wrong)
    trainer, queries = _addition_trainer(net, images, digits)
    found = trainer.relabel(queries)
    assert found.current == tuple(wrong) and found.current_value < found.total
    assert found.mapping == tuple(range(10)) * 2 and found.value == found.total == len(queries)
    assert found.current_min_usage == 1.0 and found.min_usage == 2.0  # images called 9
    assert net.value_of_cluster.tolist() == list(found.mapping)  # applied to the network
    assert trainer.concept_probs("digit_net", images).argmax(-1).tolist() == digits
    again = trainer.relabel(queries)
    assert not again.changed  # a second pass changes nothing
