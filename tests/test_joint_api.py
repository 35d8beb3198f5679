"""The joint trainer as a user of the Python API meets it: the README example, the thread count,
networks that see only their own inputs, and a fourth engine written here and plugged in."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from deepproblog.query import Query
from problog.logic import Constant, Term

from gedi_nesy.config import GediConfig, JointConfig, OptimConfig
from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.engine import LogicEngine
from gedi_nesy.logic.program import ProbabilityTable, QueryProbs, query_term, tensor_keys
from gedi_nesy.task import TaskData
from gedi_nesy.train.joint import JointTrainer
from gedi_nesy.train.run import unlabelled_pools
from gedi_nesy.train.runtime import torch_threads

ROOT = Path(__file__).resolve().parents[1]
ADDITION = ROOT / "programs/addition.pl"
OFF = GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0)


def _query(functor: str, a: Term, b: Term, s: int) -> Query:
    subs = {Term("p0"): a, Term("p1"): b}
    return Query(Term(functor, Term("p0"), Term("p1"), Constant(s)), subs)


def _key(source: str, i: int) -> Term:
    return Term("tensor", Term(source, Constant(i)))


def _indexed_images(n: int) -> torch.Tensor:
    """Image i holds the value i in its first pixel (the networks read it), (n, 1, 28, 28)."""
    images = torch.zeros(n, 1, 28, 28)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return images


@pytest.mark.needs_data
def test_the_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    """The README's own code block, on 16 sums instead of 300 (circuits in a temp cache)."""
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert "torch.arange(600)" in code
    monkeypatch.chdir(ROOT)  # the example names programs/addition.pl from the checkout
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    exec(compile(code.replace("torch.arange(600)", "torch.arange(32)"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("tensor([[")  # one step of 16 sums, then the (5, 10) rows
    assert "'logic'" in printed[0] and "'inv'" in printed[0] and "'prior'" in printed[0]
    assert 0.0 <= float(printed[-1]) <= 1.0


class _ThreadCounting(GEDINet):
    """A GEDINet that notes the torch thread count each forward runs with."""

    def __init__(self) -> None:
        super().__init__(10, width=4, feature_dim=16, proj_dim=8)
        self.threads: list[int] = []

    def cluster_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(torch.get_num_threads())
        return super().cluster_logits(x)


def test_steps_and_evaluations_run_with_optim_threads_and_leave_the_count_as_found(tmp_path):
    net = _ThreadCounting()
    cfg = JointConfig(gedi=GediConfig(w_gen=0.0), optim=OptimConfig(threads=1))
    logic = CompiledLogic(ADDITION, {"digit_net": 10}, cache_dir=tmp_path)
    trainer = JointTrainer(logic, {"digit_net": net}, {"img": _indexed_images(4)}, cfg)
    queries = [_query("addition", _key("img", 0), _key("img", 1), 1)]
    found = torch.get_num_threads()
    other = 3 if found != 3 else 2  # a count that is not optim.threads
    torch.set_num_threads(other)
    try:
        trainer.train_step(queries)
        assert torch.get_num_threads() == other
        trainer.task_accuracy(queries)
        trainer.concept_probs("digit_net", _indexed_images(2))
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(found)
    assert len(net.threads) >= 4 and set(net.threads) == {1}  # logic, GEDI views, eval, probs


def test_torch_threads_restores_the_count_after_an_error():
    found = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt), torch_threads(found + 1):
        assert torch.get_num_threads() == found + 1
        raise KeyboardInterrupt
    assert torch.get_num_threads() == found


TWO_NETS = """
nn(net_a, [X], Y, [0, 1, 2]) :: da(X, Y).
nn(net_b, [X], Y, [0, 1, 2]) :: db(X, Y).
pair(X, Y, S) :- da(X, A), db(Y, B), S is A + B.
"""


class _Recording(GEDINet):
    """A small GEDINet that keeps every batch it is run on."""

    def __init__(self) -> None:
        super().__init__(3, width=4, feature_dim=16, proj_dim=8)
        self.batches: list[torch.Tensor] = []

    def cluster_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return super().cluster_logits(x)


def test_each_network_and_its_gedi_terms_see_only_their_own_inputs(tmp_path):
    sources = {"a": torch.rand(3, 1, 28, 28) * 2 - 1, "b": torch.rand(2, 1, 28, 28) * 2 - 1}
    nets = {"net_a": _Recording(), "net_b": _Recording()}
    gedi = GediConfig(w_gen=0.0, w_inv=1.0, w_prior=1.0, clean_view=True)  # view 1 = the image
    logic = CompiledLogic(TWO_NETS, {"net_a": 3, "net_b": 3}, cache_dir=tmp_path)
    trainer = JointTrainer(logic, nets, sources, JointConfig(gedi=gedi), device="cpu")
    queries = [_query("pair", _key("a", 0), _key("b", 1), 2),
               _query("pair", _key("a", 2), _key("b", 0), 1)]  # fmt: skip
    assert trainer.route(queries) == {"net_a": [_key("a", 0), _key("a", 2)],
                                      "net_b": [_key("b", 1), _key("b", 0)]}  # fmt: skip
    extra = {"net_a": sources["a"][1:2]}  # unlabelled images for net_a's GEDI terms only
    _, values = trainer.loss(queries, extra)
    own = {"net_a": sources["a"][[0, 2]], "net_b": sources["b"][[1, 0]]}
    for name, net in nets.items():
        logic_batch, gedi_batch = net.batches  # one forward for the logic, one for the terms
        assert torch.equal(logic_batch, own[name]), name
        clean = own[name] if name == "net_b" else torch.cat([own[name], extra[name]])
        assert len(gedi_batch) == 2 * len(clean)  # the image and one random view of each
        assert torch.equal(gedi_batch[: len(clean)], clean), name
    assert {"net_a.inv", "net_a.prior", "net_b.inv", "net_b.prior"} <= set(values)
    assert math.isfinite(values["logic"]) and values["unprovable"] == 0
    task = TaskData("pairs", Path("pairs.pl"), {"net_a": 3, "net_b": 3}, sources, queries, [],
                    [], "a", torch.zeros(3), unlabelled={"b": torch.tensor([0, 1])})  # fmt: skip
    pools = unlabelled_pools(trainer, task)  # source b's pool feeds net_b alone
    assert list(pools) == ["net_b"] and pools["net_b"][0] == "b"


class SumEngine:
    """A fourth engine, written here: single-digit ``addition(X, Y, S)`` computed from the
    digit tables by hand, ``P(S = s) = sum_i p_X(i) p_Y(s - i)``. It keeps the LogicEngine
    protocol and nothing else."""

    source = "<sum engine>"

    def __init__(self) -> None:
        self.networks = {"digit_net": 10}

    def _sums(self, queries, tables) -> torch.Tensor:
        table = tables["digit_net"]
        rows = []
        for q in queries:
            x, y, _ = query_term(q).args
            outer = table.probs[table.index[x]][:, None] * table.probs[table.index[y]][None, :]
            rows.append(torch.stack([outer.flip(1).diagonal(9 - s).sum() for s in range(19)]))
        return torch.stack(rows)  # (Q, 19): P(sum = s)

    def query_probs(self, queries, tables) -> QueryProbs:
        sums = [int(query_term(q).args[2]) for q in queries]
        dist = self._sums(queries, tables)  # (Q, 19)
        provable = torch.tensor([0 <= s <= 18 for s in sums])
        probs = torch.stack([dist[i, s] if ok else dist.new_zeros(())
                             for i, (s, ok) in enumerate(zip(sums, provable))])  # fmt: skip
        return QueryProbs(probs, provable)

    def answer_probs(self, queries, domain, tables) -> QueryProbs:
        dist = self._sums(queries, tables)[:, [int(d) for d in domain]]  # (Q, A)
        return QueryProbs(dist, torch.ones(len(queries), dtype=torch.bool))

    def best_answers(self, queries, tables):
        return [Constant(int(s)) for s in self._sums(queries, tables).argmax(1).tolist()]

    def referenced_keys(self, queries):
        return {"digit_net": tensor_keys(queries)}


class _TableNet(torch.nn.Module):
    """Learnable logits per image index (the index is the first pixel): log of a fixed table."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.log(probs.float() + 1e-12))  # (n, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()]  # (B, 10)


def test_a_fourth_engine_written_here_plugs_into_the_trainer_and_trains(digit_probs):
    engine = SumEngine()
    assert isinstance(engine, LogicEngine)
    net = _TableNet(digit_probs.detach())  # rows 0-3: conftest.HAND_ROWS
    cfg = JointConfig(gedi=OFF, optim=OptimConfig(lr=0.1))
    trainer = JointTrainer(engine, {"digit_net": net}, {"img": _indexed_images(8)}, cfg)
    queries = [
        _query("addition", _key("img", 0), _key("img", 1), 5),  # p = .4 .5 + .6 .5 = .5
        _query("addition", _key("img", 0), _key("img", 3), 9),  # p = .6 (2 + 7)
        _query("addition", _key("img", 2), _key("img", 3), 19),
    ]  # no two digits: 19
    _, values = trainer.loss(queries)  # fmt: skip
    assert values["logic"] == pytest.approx(-(math.log(0.5) + math.log(0.6)) / 2, rel=1e-5)
    assert values["unprovable"] == 1
    table = ProbabilityTable([_key("img", 0), _key("img", 1)], digit_probs.detach()[:2])
    assert engine.best_answers(queries[:1], {"digit_net": table}) == [Constant(5)]  # p = .5
    losses = [trainer.train_step(queries[:2])["logic"] for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]
    assert trainer.task_accuracy(queries[:2]) == 1.0
