"""Learnable ``t(...)`` probabilities: both engines against stock DeepProbLog's probabilities,
gradients and SGD update, a few joint-trainer steps towards the generating value, checkpoints,
and the forms that are refused.

Every comparison builds DeepProbLog's own model (stock Network, GraphSemiring, ``set_engine``,
its ``SGD`` optimiser) on the same program, in float64 (DeepProbLog reads ``t(i)`` in torch's
default dtype).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import FixedTableNet, IndexSource
from deepproblog.engines import ExactEngine
from deepproblog.model import Model
from deepproblog.network import Network
from deepproblog.optimizer import SGD
from deepproblog.query import Query
from problog.logic import Constant, Term

from gedi_nesy.config import (
    GediConfig,
    JointConfig,
    LogicConfig,
    ModelConfig,
    NesyRunConfig,
    OptimConfig,
)
from gedi_nesy.errors import ProgramError
from gedi_nesy.logic.chain import ColumnChainLogic
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.logic.params import ProjectedSGD, project_probabilities
from gedi_nesy.logic.program import ProbabilityTable
from gedi_nesy.task import TaskData
from gedi_nesy.train.checkpoint import load_checkpoint
from gedi_nesy.train.joint import JointTrainer
from gedi_nesy.train.run import run_training

NOISY = """nn(digit_net, [X], Y, [0, 1, 2]) :: digit(X, Y).
t(0.3) :: noisy.
label(X, 0) :- noisy.
label(X, Y) :- \\+ noisy, digit(X, Y).
"""
COIN = """nn(digit_net, [X], Y, [0, 1, 2]) :: digit(X, Y).
t(0.5) :: coin(h); t(0.2) :: coin(t).
flip(X) :- coin(t), digit(X, 1).
flip(X) :- coin(h), digit(X, 2).
none(X) :- \\+ coin(h), \\+ coin(t), digit(X, 0).
"""
ROWS = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]], dtype=torch.float64)  # img(0), img(1)


def img(i: int) -> Term:
    return Term("tensor", Term("img", Constant(i)))


def term(text: str) -> Term:
    return Term.from_string(text)


@pytest.fixture
def float64_default() -> Iterator[None]:
    """DeepProbLog's t(i) leaf takes torch's default dtype: float64 for exact comparisons."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def stock_model(text: str, rows: torch.Tensor, lr: float) -> Model:
    model = Model(text, [Network(FixedTableNet(rows), "digit_net")], load=False)
    model.set_engine(ExactEngine(model))
    model.add_tensor_source("img", IndexSource())
    model.optimizer = SGD(model, lr)
    return model


ENGINES: dict[str, Callable[..., object]] = {
    "compiled": lambda text, folder: CompiledLogic(text, {"digit_net": 3}, cache_dir=folder),
    "deepproblog": lambda text, folder: LogicModel(text, {"digit_net": 3}),
}


def ours_and_stock(engine: str, text: str, queries: list[Term], tmp_path, lr: float = 0.1):
    """(our engine, our P (Q,), stock model, stock P list) on the fixed rows, after a backward
    of sum_q (q + 1) P(q) through each (parameter gradients accumulated)."""
    logic = ENGINES[engine](text, tmp_path)
    table = {"digit_net": ProbabilityTable([img(0), img(1)], ROWS.clone().requires_grad_())}
    got = logic.query_probs([Query(q) for q in queries], table).probs  # (Q,)
    weights = torch.arange(1.0, len(queries) + 1, dtype=torch.float64)  # (Q,)
    (weights * got).sum().backward()
    model = stock_model(text, ROWS.clone().requires_grad_(), lr)
    model.optimizer.zero_grad()
    expected = [r.result[q] for r, q in zip(model.solve([Query(q) for q in queries]), queries)]
    sum(w * p for w, p in zip(weights, expected)).backward()
    return logic, got, model, expected


def stock_gradient(model: Model) -> list[float]:
    return [float(model.optimizer._params_grad[i]) for i in range(len(model.parameters))]


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_noisy_fact_probability_and_gradient_equal_deepproblog(engine, tmp_path, float64_default):
    queries = [term("label(tensor(img(0)), 1)"), term("label(tensor(img(0)), 0)")]
    logic, got, model, expected = ours_and_stock(engine, NOISY, queries, tmp_path)
    assert got.tolist() == pytest.approx([0.21, 0.44], abs=1e-15)  # 0.7 * 0.3; 0.3 + 0.7 * 0.2
    assert got.tolist() == pytest.approx([float(p) for p in expected], abs=1e-15)
    grad = logic.parameters.probs.grad.tolist()  # d/dp (P1 + 2 P2) = -0.3 + 2 * 0.8 = 1.3
    assert grad == pytest.approx([1.3], abs=1e-12)
    assert grad == pytest.approx(stock_gradient(model), abs=1e-12)
    assert logic.parameters.values() == {"noisy": 0.3}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_annotated_disjunction_matches_deepproblog_and_its_sgd_step(engine, tmp_path,
                                                                     float64_default):  # fmt: skip
    queries = [term("flip(tensor(img(1)))"), term("none(tensor(img(0)))")]
    lr = 0.5
    logic, got, model, expected = ours_and_stock(engine, COIN, queries, tmp_path, lr)
    assert got.tolist() == pytest.approx([0.17, 0.06], abs=1e-15)  # .2*.1 + .5*.3; .3 * .2
    assert got.tolist() == pytest.approx([float(p) for p in expected], abs=1e-15)
    grad = logic.parameters.probs.grad.tolist()  # (0.3 - 2 * 0.2, 0.1 - 2 * 0.2)
    assert grad == pytest.approx([-0.1, -0.3], abs=1e-12)
    assert grad == pytest.approx(stock_gradient(model), abs=1e-12)
    ProjectedSGD(logic.parameters, lr).step()
    model.optimizer.step()
    values = logic.parameters.probs.tolist()  # (0.55, 0.35) / 0.9
    assert values == pytest.approx([0.55 / 0.9, 0.35 / 0.9], abs=1e-12)
    assert values == pytest.approx(model.parameters, abs=1e-12)
    assert sum(values) == pytest.approx(1.0, abs=1e-15)


def test_projection_clamps_then_normalises_each_group_as_deepproblog():
    probs = torch.tensor([1.4, -0.2, 0.3, 0.6, -1.0, -2.0], dtype=torch.float64)
    out = project_probabilities(probs, [[1, 2, 3], [4, 5]])
    # 1.4 -> 1; (0, 0.3, 0.6) / 0.9; an all-zero group becomes uniform (DeepProbLog: 0 / 0)
    assert out.tolist() == pytest.approx([1.0, 0.0, 1 / 3, 2 / 3, 0.5, 0.5], abs=1e-15)
    assert probs.tolist()[0] == 1.4  # a pure function: the input is unchanged


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_random_starts_equal_deepproblog_and_compiling_draws_nothing(engine, tmp_path):
    text = NOISY.replace("t(0.3)", "t(_)") + "t(_) :: coin(h); t(_) :: coin(t).\n"
    random.seed(5)
    logic = ENGINES[engine](text, tmp_path)
    after_ours = random.random()
    random.seed(5)
    model = Model(text, [], load=False)
    assert logic.parameters.probs.tolist() == model.parameters  # drawn in DeepProbLog's order
    assert after_ours == random.random()  # the engine drew as many numbers as DeepProbLog
    assert logic.parameters.groups == model.parameter_groups == [[1, 2]]
    state = random.getstate()
    table = {"digit_net": ProbabilityTable([img(0)], ROWS[:1])}
    logic.query_probs([Query(term("label(tensor(img(0)), 1)"))], table)  # grounds, compiles
    assert random.getstate() == state


TOSS = """nn(digit_net, [X], Y, [0, 1]) :: bit(X, Y).
t(0.5) :: heads.
toss(X, h) :- bit(X, _), heads.
toss(X, t) :- bit(X, _), \\+ heads.
"""


def toss_trainer(param_lr: float, tmp_path) -> tuple[JointTrainer, list[Query]]:
    """A trainer on 10 tosses of image i, 8 heads and 2 tails (generated with P(heads) = 0.8)."""
    logic = CompiledLogic(TOSS, {"digit_net": 2}, cache_dir=tmp_path)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    cfg = JointConfig(
        gedi=GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0),
        optim=OptimConfig(lr=1e-3, param_lr=param_lr, device="cpu"),
    )
    images = torch.randn(10, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    trainer = JointTrainer(logic, {"digit_net": net}, {"img": images}, cfg)
    sides = "hhhhthhhth"
    queries = [Query(Term("toss", img(i), Term(side))) for i, side in enumerate(sides)]
    return trainer, queries


def test_joint_steps_move_the_parameter_to_the_generating_value(tmp_path):
    trainer, queries = toss_trainer(0.05, tmp_path)
    p, seen = 0.5, []
    for _ in range(30):
        values = trainer.train_step(queries)
        assert values["t:heads"] == pytest.approx(p, abs=1e-6)  # the value the loss read
        seen.append(values["t:heads"])
        p = p + 0.05 * (0.8 / p - 0.2 / (1 - p))  # SGD on -(8 log p + 2 log(1 - p)) / 10
    final = trainer.parameters.values()["heads"]
    assert final == pytest.approx(p, abs=1e-5)
    assert seen == sorted(seen) and abs(final - 0.8) < 0.01  # 0.5 -> 0.8, monotone


def test_checkpoint_keeps_the_parameters_and_resume_continues_identically(tmp_path):
    trainer, queries = toss_trainer(0.05, tmp_path / "a")
    for _ in range(3):
        trainer.train_step(queries)
    torch.save(trainer.state_dict(), tmp_path / "checkpoint.pt")
    resumed, _ = toss_trainer(0.05, tmp_path / "b")
    assert resumed.parameters.values() == {"heads": 0.5}
    resumed.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt"))  # weights_only read
    assert resumed.parameters.values() == trainer.parameters.values() != {"heads": 0.5}
    assert trainer.train_step(queries) == resumed.train_step(queries)
    assert resumed.parameters.values() == trainer.parameters.values()
    assert set(trainer.validated_modules()) == {"digit_net", "$t"}


def test_programs_without_t_keep_their_trainer_state_and_engines_have_no_parameters(tmp_path):
    text = TOSS.replace("t(0.5) :: heads.", "0.5 :: heads.")
    logic = CompiledLogic(text, {"digit_net": 2}, cache_dir=tmp_path)
    trainer = JointTrainer(logic, {"digit_net": torch.nn.Sequential(torch.nn.Flatten(),
                                                                     torch.nn.Linear(4, 2))},
                           {"img": torch.zeros(1, 1, 2, 2)},
                           JointConfig(gedi=GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0)),
                           device="cpu")  # fmt: skip
    assert logic.parameters is None and LogicModel(text, {"digit_net": 2}).parameters is None
    assert "t" not in trainer.state_dict() and "$t" not in trainer.validated_modules()


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("t(0.5) :: a(X); t(0.5) :: b(X) :- digit(X, 0).", r"<program>:5: .* with a body and t\("),
        ("t(0.5) :: a; 0.5 :: b.", r"<program>:5: .* mixes t\(\.\.\.\) and fixed probabilities"),
        ("t(1.5) :: a.", r"<program>:5: t\(1\.5\)::a starts at 1\.5; write t\(p\) with p a number"),
        ("t(0.1, 2) :: a.", r"<program>:5: .* has t/2"),
    ],
)
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_untrainable_t_is_one_line_program_error_naming_the_line(engine, line, fragment, tmp_path):
    with pytest.raises(ProgramError, match=fragment) as error:
        ENGINES[engine](NOISY + line + "\n", tmp_path)
    assert "\n" not in str(error.value)


def test_column_chain_refuses_t(tmp_path):
    text = (
        "nn(digit_net, [X], Y, [0,1,2,3,4,5,6,7,8,9]) :: digit(X, Y).\n"
        "t(0.1) :: noisy.\n"
        "column(A, B, C, D, E) :- digit(A, X), digit(B, Y), S is X + Y + C, D is S mod 10, "
        "E is S // 10.\n"
    )
    logic = CompiledLogic(text, {"digit_net": 10}, cache_dir=tmp_path)
    with pytest.raises(ProgramError, match=r"column_chain .* cannot train .* \['noisy'\]"):
        ColumnChainLogic(logic)


def toss_run(tmp_path: Path, folder: str, resume: bool = False) -> dict:
    """``run_training`` on 16 random images tossed as TOSS (4 steps of 4 queries, no MNIST)."""
    program = tmp_path / "toss.pl"
    program.write_text(TOSS)
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    queries = [Query(Term("toss", img(i), Term("t" if i % 5 == 4 else "h"))) for i in range(16)]
    labels = torch.zeros(16, dtype=torch.long)  # (16,) concept labels, unused here
    task = TaskData("toss", program, {"digit_net": 2}, {"img": images}, queries, queries[:4],
                    queries[4:8], "img", labels)  # fmt: skip
    cfg = NesyRunConfig(
        name="toss", out_dir=str(tmp_path / folder), task={"name": "toss"},
        model=ModelConfig(width=4), gedi=GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0),
        optim=OptimConfig(batch_size=4, param_lr=0.05, log_every=1, checkpoint_every=1,
                          device="cpu"),
        logic=LogicConfig(cache_dir=str(tmp_path / "circuits")),
    )  # fmt: skip
    return run_training(cfg, task, resume=resume, progress=False)


def test_a_run_reports_the_probabilities_and_resume_restores_them(
    tmp_path, monkeypatch, crash_joint_training_at
):
    straight = toss_run(tmp_path, "straight")
    learned = straight["learned_probabilities"]["heads"]
    assert 0.5 < learned < 0.8  # 4 steps from 0.5 towards 13 heads in 16
    real_step = crash_joint_training_at(2)  # dies before step 3
    with pytest.raises(KeyboardInterrupt):
        toss_run(tmp_path, "killed")
    monkeypatch.setattr(JointTrainer, "train_step", real_step)
    resumed = toss_run(tmp_path, "killed", resume=True)
    assert resumed["learned_probabilities"] == straight["learned_probabilities"]
    logs = [(tmp_path / f / "toss/log.jsonl").read_text() for f in ("straight", "killed")]
    rows = [[json.loads(line)["t:heads"] for line in log.splitlines()] for log in logs]
    assert rows[0] == rows[1] and len(rows[0]) == 4 and rows[0][0] == 0.5
