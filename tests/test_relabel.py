"""Logic-guided relabelling: the branch-and-bound search on hand-built groups, and the trainer
step that renames a network's concept values on real queries of programs/addition.pl."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from deepproblog.query import Query
from problog.logic import Constant, Term

from gedi_nesy.augment import AugmentConfig
from gedi_nesy.compiled import CompiledLogic
from gedi_nesy.config import GediConfig, NesyOptimConfig, SGLDConfig
from gedi_nesy.errors import ConfigError
from gedi_nesy.experiment import _relabel_due
from gedi_nesy.relabel import best_permutation
from gedi_nesy.trainer import JointTrainer

ROOT = Path(__file__).resolve().parents[1]
ADDITION = ROOT / "programs/addition.pl"


def _sum_groups(pairs_sums_counts):
    """Groups ((a, b), count) with a score that proves sum s when pi(a) + pi(b) == s."""
    groups = [((a, b), float(n)) for a, b, _, n in pairs_sums_counts]
    sums = [s for _, _, s, _ in pairs_sums_counts]

    def score(g, mapped):
        return 1.0 if mapped[0] + mapped[1] == sums[g] else 0.0

    return groups, score


def _brute_force(k, groups, score):
    def value(perm):
        return sum(w * score(g, tuple(perm[c] for c in vals)) for g, (vals, w) in enumerate(groups))

    return max(value(p) for p in itertools.permutations(range(k)))


def test_a_swapped_labelling_is_undone():
    # true values: cluster 0 is 0, cluster 1 is 2, cluster 2 is 1 (clusters 1 and 2 swapped)
    groups, score = _sum_groups([(0, 1, 2, 5), (0, 2, 1, 4), (1, 2, 3, 3), (2, 2, 2, 2)])
    found = best_permutation(3, groups, score)
    assert found.perm == (0, 2, 1)
    assert found.value == 14.0 and found.total == 14.0  # every query proved after the swap
    assert found.identity_value == 3.0  # before: only (1, 2) -> 3 is proved, 3 queries
    assert found.complete


def test_identity_kept_when_nothing_proves_more():
    groups, score = _sum_groups([(0, 1, 1, 3), (1, 1, 2, 1)])
    found = best_permutation(3, groups, score)
    assert found.perm == (0, 1, 2) and found.value == found.identity_value == 4.0


@pytest.mark.parametrize("seed", range(5))
def test_branch_and_bound_equals_brute_force_on_noisy_groups(seed):
    gen = torch.Generator().manual_seed(seed)
    k = 5
    rows = []
    for _ in range(12):
        a, b = torch.randint(k, (2,), generator=gen).tolist()
        s = int(torch.randint(2 * k - 1, (1,), generator=gen))
        rows.append((a, b, s, int(torch.randint(1, 9, (1,), generator=gen))))
    groups, score = _sum_groups(rows)
    found = best_permutation(k, groups, score)
    assert found.complete and found.value == _brute_force(k, groups, score)
    assert found.value >= found.identity_value
    recomputed = sum(w * score(g, tuple(found.perm[c] for c in vals))
                     for g, (vals, w) in enumerate(groups))  # fmt: skip
    assert recomputed == found.value


def test_budget_stops_the_search_and_says_so():
    groups, score = _sum_groups([(a, b, (a + b + 3) % 9, 1) for a in range(5) for b in range(5)])
    found = best_permutation(5, groups, score, max_nodes=3)
    assert not found.complete and found.nodes == 3
    assert found.value >= found.identity_value


@pytest.mark.parametrize(
    "k, groups, nodes, match",
    [(0, [], 10, "k = 0"), (3, [((0, 3), 1.0)], 10, r"0\.\.2"), (3, [((0,), -1.0)], 10, "weight"),
     (3, [], 0, "max_nodes = 0")],
)  # fmt: skip
def test_bad_input_is_a_one_line_error(k, groups, nodes, match):
    with pytest.raises(ConfigError, match=match):
        best_permutation(k, groups, lambda g, m: 1.0, max_nodes=nodes)


class _LabelNet(torch.nn.Module):
    """Reads the digit written in pixel (0, 0) and scores it through a linear ``head``."""

    def __init__(self, wrong_names: list[int]) -> None:
        super().__init__()
        self.head = torch.nn.Linear(10, 10, bias=False)
        with torch.no_grad():  # row wrong_names[d] fires for digit d: digit d is called that
            self.head.weight.zero_()
            for d, name in enumerate(wrong_names):
                self.head.weight[name, d] = 10.0

    def forward(self, x):
        onehot = torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()  # (B, 10)
        return self.head(onehot)  # (B, 10)


def _query(a, b, s):
    subs = {Term("p0"): Term("tensor", Term("img", Constant(a))),
            Term("p1"): Term("tensor", Term("img", Constant(b)))}  # fmt: skip
    return Query(Term("addition", Term("p0"), Term("p1"), Constant(s)), subs)


def test_trainer_relabels_a_network_that_names_digits_wrongly():
    digits = list(range(10)) * 2  # image i shows digit i % 10
    images = torch.zeros(20, 1, 28, 28)
    images[:, 0, 0, 0] = torch.tensor(digits, dtype=torch.float32)
    wrong = [0, 1, 6, 3, 8, 5, 2, 7, 4, 9]  # the EvenOdd local optimum: 2<->6, 4<->8
    net = _LabelNet(wrong)
    trainer = JointTrainer(
        CompiledLogic(ADDITION, {"digit_net": 10}), {"digit_net": net}, {"img": images},
        gedi=GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0), sgld=SGLDConfig(),
        augment=AugmentConfig(), optim=NesyOptimConfig(relabel_every=1),
        device=torch.device("cpu"),
    )  # fmt: skip
    pairs = [(i, j) for i in range(20) for j in range(20) if (i * 7 + j) % 5 == 0]
    queries = [_query(i, j, digits[i] + digits[j]) for i, j in pairs]
    trainer.train_step(queries[:8])  # gives Adam a state to move with the rows
    moment = trainer.optimizer.state[net.head.weight]["exp_avg"].clone()  # (10, 10)
    found = trainer.relabel(queries)
    assert found.identity_value < found.total  # the wrong names fail some sums
    assert found.value == found.total == len(queries)  # after renaming, every sum is proved
    predicted = trainer.concept_probs("digit_net", images).argmax(-1).tolist()
    assert predicted == digits  # the head's rows moved: the network now names digits right
    moved = trainer.optimizer.state[net.head.weight]["exp_avg"]
    assert all(torch.equal(moved[found.perm[c]], moment[c]) for c in range(10))
    assert trainer.relabel(queries).perm == tuple(range(10))  # a second pass changes nothing


def _no_head() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))


def test_relabel_every_needs_one_network_with_a_head():
    with pytest.raises(ConfigError, match="optim.relabel_every = 5"):
        JointTrainer(
            CompiledLogic(ADDITION, {"digit_net": 10}), {"digit_net": _no_head()},
            {"img": torch.zeros(2, 1, 28, 28)}, gedi=GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0),
            sgld=SGLDConfig(), augment=AugmentConfig(), optim=NesyOptimConfig(relabel_every=5),
            device=torch.device("cpu"),
        )  # fmt: skip


def test_relabelling_runs_after_the_warm_up_and_never_after_the_last_step():
    o = NesyOptimConfig(relabel_every=100, gedi_only_steps=150)
    due = [step for step in range(1, 1051) if _relabel_due(o, step, 1050)]
    assert due == list(range(250, 1050, 100))
    assert not any(_relabel_due(NesyOptimConfig(), step, 1050) for step in range(1, 1051))
