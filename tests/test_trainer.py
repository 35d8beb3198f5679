"""The joint trainer: DeepProbLog's own gradients with the GEDI weights at 0, the GEDI terms,
unprovable-query counting, and a joint run that resumes to the same result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from deepproblog.engines import ExactEngine
from deepproblog.model import Model
from deepproblog.network import Network
from deepproblog.query import Query
from deepproblog.train import TrainObject
from problog.logic import Constant, Term

import gedi_nesy.train.run as run
from gedi_nesy.cli import main
from gedi_nesy.config import (
    AugmentConfig,
    GediConfig,
    JointConfig,
    OptimConfig,
    SGLDConfig,
    SupervisionConfig,
)
from gedi_nesy.gedi.augment import augment as random_view
from gedi_nesy.gedi.nets import GEDINet
from gedi_nesy.logic.compiled import CompiledLogic
from gedi_nesy.logic.dpl import LogicModel
from gedi_nesy.logic.engine import LogProbEngine
from gedi_nesy.logic.program import QueryLogProbs, tensor_keys
from gedi_nesy.train.joint import JointTrainer, logic_loss
from gedi_nesy.train.terms import log_logic_loss

ROOT = Path(__file__).resolve().parents[1]
ADDITION = ROOT / "programs/addition.pl"


class _Images:
    """DeepProbLog tensor source: ``tensor(img(i))`` -> image i."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __getitem__(self, args):
        return self.images[int(args[0])]


def _queries(pairs_and_sums):
    out = []
    for a, b, s in pairs_and_sums:
        subs = {Term("p0"): Term("tensor", Term("img", Constant(a))),
                Term("p1"): Term("tensor", Term("img", Constant(b)))}  # fmt: skip
        out.append(Query(Term("addition", Term("p0"), Term("p1"), Constant(s)), subs))
    return out


def _trainer(net, images, gedi: GediConfig, logic=None) -> JointTrainer:
    cfg = JointConfig(gedi=gedi, sgld=SGLDConfig(buffer_size=32, n_steps=2))
    logic = logic or LogicModel(ADDITION, {"digit_net": 10})
    return JointTrainer(logic, {"digit_net": net}, {"img": images}, cfg, device="cpu")


def _small_net(seed: int = 0) -> GEDINet:
    torch.manual_seed(seed)
    return GEDINet(k=10, width=4, feature_dim=16, proj_dim=8)


def _assert_same_gradients(ours: dict, theirs: list[torch.Tensor]) -> None:
    """Equal to 1e-4 relative; a bias just before a GroupNorm has zero gradient in exact
    arithmetic, so there both sides are rounding noise, and the absolute tolerance is 1e-5 of
    the network's largest gradient."""
    scale = max(float(g.abs().max()) for g in theirs)
    assert scale > 0
    for (name, a), b in zip(ours.items(), theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale), name


OFF = GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0)
QUERIES = [(0, 1, 7), (2, 3, 12), (4, 5, 0), (6, 7, 18), (1, 6, 9)]


def test_gradients_equal_deepproblogs_own_training_step():
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    queries = _queries(QUERIES)

    ours = _small_net()
    total, values = _trainer(ours, images, OFF).loss(queries)
    total.backward()

    stock = _small_net()  # same seed: same weights
    module = torch.nn.Sequential(stock, torch.nn.Softmax(-1))
    model = Model(ADDITION.read_text(), [Network(module, "digit_net", batching=True)], load=False)
    model.set_engine(ExactEngine(model), cache=True)
    model.add_tensor_source("img", _Images(images))
    stock_loss = TrainObject(model).get_loss(queries, model.solver.semiring.cross_entropy)

    assert values["logic"] == pytest.approx(float(stock_loss), rel=1e-6)
    assert values["unprovable"] == 0
    _assert_same_gradients(
        {name: p.grad for name, p in ours.named_parameters()},
        [q.grad for q in stock.parameters()],
    )


def test_compiled_engine_gives_the_same_loss_and_gradients(tmp_path):
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    queries = _queries(QUERIES + [(3, 3, 4)])  # one image twice
    grads = []
    for logic in [None, CompiledLogic(ADDITION, {"digit_net": 10}, cache_dir=tmp_path)]:
        net = _small_net()
        total, values = _trainer(net, images, OFF, logic).loss(queries)
        total.backward()
        grads.append((values["logic"], [p.grad.clone() for p in net.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    _assert_same_gradients(dict(enumerate(grads[0][1])), grads[1][1])


def test_logic_loss_counts_unprovable_and_keeps_them_out_of_the_mean():
    probs = torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64)
    provable = torch.tensor([True, False, True])
    # -(log 0.5 + log 0.25) / 2 = 1.5 log 2
    assert logic_loss(probs, provable).item() == pytest.approx(1.5 * 0.6931471805599453, rel=1e-9)
    assert logic_loss(probs, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    images = torch.rand(8, 1, 28, 28) * 2 - 1
    _, values = _trainer(_small_net(), images, OFF).loss(_queries([(0, 1, 3), (2, 3, 19)]))
    assert values["unprovable"] == 1  # no two digits sum to 19


def test_log_logic_loss_has_no_eps_and_no_nan():
    log_probs = torch.tensor([math.log(0.5), -math.inf, -3000.0, -math.inf], dtype=torch.float64)
    log_probs.requires_grad_()
    provable = torch.tensor([True, False, True, True])  # the last: provable, P = 0
    # (-log 0.5 + 3000 - log 1e-12) / 3: P = 0 counts as DeepProbLog's eps would
    expected = (math.log(2) + 3000.0 - math.log(1e-12)) / 3
    loss = log_logic_loss(log_probs, provable)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, log_probs)
    assert grad.tolist() == pytest.approx([-1 / 3, 0.0, -1 / 3, 0.0])
    assert log_logic_loss(log_probs, torch.zeros(4, dtype=torch.bool)).item() == 0.0
    # equal to logic_loss up to its eps where P is far above 1e-12
    probs = torch.tensor([0.5, 0.25], dtype=torch.float64)
    both = torch.tensor([True, True])
    assert log_logic_loss(probs.log(), both).item() == pytest.approx(
        logic_loss(probs, both).item(), rel=1e-10
    )


class _LogCompiled(CompiledLogic):
    """A compiled engine that also gives log-probabilities (a LogProbEngine), and counts calls."""

    calls = 0

    def query_log_probs(self, queries, tables):
        _LogCompiled.calls += 1
        probs, provable = self.query_probs(queries, tables)
        return QueryLogProbs(probs.log(), provable)


def test_the_trainer_takes_log_probabilities_when_the_engine_gives_them(tmp_path):
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    queries = _queries(QUERIES)
    plain = CompiledLogic(ADDITION, {"digit_net": 10}, cache_dir=tmp_path)
    logs = _LogCompiled(ADDITION, {"digit_net": 10}, cache_dir=tmp_path)
    assert isinstance(logs, LogProbEngine) and not isinstance(plain, LogProbEngine)
    _, eps_values = _trainer(_small_net(), images, OFF, plain).loss(queries)
    _, log_values = _trainer(_small_net(), images, OFF, logs).loss(queries)
    assert _LogCompiled.calls == 1
    # the same loss up to DeepProbLog's eps: log(P + 1e-12) - log P = 1e-12 / P, and the
    # untrained network gives 18 = 9 + 9 a probability near 1e-8
    assert log_values["logic"] == pytest.approx(eps_values["logic"], rel=1e-5)
    assert log_values["logic"] != eps_values["logic"]


def test_most_probable_sum_and_sum_of_argmax_digits_differ():
    # both images: digit 0 (0.4), 1 (0.3), 2 (0.3). Sum of the argmax digits: 0 (p = 0.16); the
    # most probable sum: 2 (0.3 * 0.3 + 2 * 0.4 * 0.3 = 0.33), above 1 (0.24), 3 (0.18), 4 (0.09)
    row = torch.tensor([0.4, 0.3, 0.3] + [0.0] * 7)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))  # something for the optimiser

        def forward(self, x):
            return row.clamp_min(1e-30).log().expand(len(x), 10)  # (B, 10): softmax = row

    trainer = _trainer(Fixed(), torch.zeros(2, 1, 28, 28), OFF)
    map_right, argmax_right = _queries([(0, 1, 2)]), _queries([(0, 1, 0)])
    assert trainer.task_accuracy(map_right) == 1.0 and trainer.task_accuracy(argmax_right) == 0.0
    assert trainer.argmax_task_accuracy(map_right) == 0.0
    assert trainer.argmax_task_accuracy(argmax_right) == 1.0


def test_tensor_keys_are_distinct_in_first_seen_order():
    keys = tensor_keys(_queries([(3, 1, 4), (1, 2, 3)]))
    assert [int(k.args[0].args[0]) for k in keys] == [3, 1, 2]


def test_gedi_terms_join_the_loss_and_every_part_is_logged():
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1
    gedi = GediConfig(w_gen=1.0, w_inv=0.5, w_prior=0.5, energy_reg=0.0)
    trainer = _trainer(_small_net(), images, gedi)
    values = trainer.train_step(_queries(QUERIES), extra={"digit_net": images[:3]})
    assert {"logic", "gen", "inv", "prior", "total", "unprovable"} <= set(values)
    expected = values["logic"] + values["gen"] + 0.5 * values["inv"] + 0.5 * values["prior"]
    assert values["total"] == pytest.approx(expected, rel=1e-5)
    assert trainer.step == 1


ORACLE_LABELS = torch.tensor([3, 5, 0, 9, 7, 1, 2, 8])  # the digit of oracle image i
ORACLE_IMAGES = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 28, 28).contiguous()  # i in image i


class Oracle(torch.nn.Module):
    """A perfect concept network on ORACLE_IMAGES: all mass on image i's digit ORACLE_LABELS[i]."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # something for the optimiser

    def forward(self, x):
        idx = x.flatten(1)[:, 0].round().long()  # (B,)
        return torch.nn.functional.one_hot(ORACLE_LABELS[idx], 10).float() * 50.0


def test_task_accuracy_with_a_perfect_concept_network():
    labels, images = ORACLE_LABELS, ORACLE_IMAGES
    trainer = _trainer(Oracle(), images, OFF)  # any module: the GEDI terms are off
    right = _queries([(0, 1, 8), (2, 3, 9), (4, 5, 8)])
    wrong = _queries([(0, 1, 7), (6, 7, 1)])
    assert trainer.task_accuracy(right) == 1.0
    assert trainer.task_accuracy(right + wrong) == pytest.approx(3 / 5)

    # label-free usage on the training images 0-5 (digits 3 5 0 9 7 1): six values once each
    from gedi_nesy.task import TaskData

    task = TaskData("t", ADDITION, {"digit_net": 10}, {"img": images}, right, [], [], "img",
                    labels)  # fmt: skip
    usage = run.training_usage(trainer, task)
    expected = [1 / 6 if d in (3, 5, 0, 9, 7, 1) else 0.0 for d in range(10)]
    assert usage["train_usage_c"] == pytest.approx(expected, abs=1e-6)
    assert usage["train_min_usage_c"] == 0.0  # digits 2, 4, 6, 8 never predicted


def test_evaluate_reports_the_task_accuracy_on_the_training_queries(tmp_path):
    from gedi_nesy.task import TaskData

    labels, images = ORACLE_LABELS, ORACLE_IMAGES
    trainer = _trainer(Oracle(), images, OFF)
    train = _queries([(0, 1, 8), (2, 3, 9), (4, 5, 8), (0, 1, 7), (6, 7, 1)])  # 3 right, 2 wrong
    test = _queries([(6, 7, 10)])  # 2 + 8 = 10: right
    task = TaskData("t", ADDITION, {"digit_net": 10}, {"img": images}, train, [], test, "img",
                    labels)  # fmt: skip
    metrics = run.evaluate(trainer, task, tmp_path)
    assert metrics["train_task_acc"] == pytest.approx(3 / 5)  # the training sums' own labels
    assert metrics["test_task_acc"] == 1.0


SMOKE = str(ROOT / "configs/smoke_train.yaml")


@pytest.mark.needs_data
def test_train_smoke_run_and_resume_to_the_same_result(
    tmp_path, monkeypatch, crash_joint_training_at
):
    common = ["train", SMOKE, "--no-progress", "--set", f"logic.cache_dir={tmp_path / 'cc'}"]
    threads = torch.get_num_threads()
    assert main(common + ["--set", f"out_dir={tmp_path / 'straight'}"]) == 0
    assert torch.get_num_threads() == threads  # the run set optim.threads, then restored ours
    run = tmp_path / "straight/smoke_train"
    for name in ["config.yaml", "metrics.json", "log.jsonl", "checkpoint.pt",
                 "confusion_digit_net.png", "confusion_digit_net.json"]:  # fmt: skip
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0.0 <= metrics["test_task_acc"] <= 1.0
    assert metrics["unprovable_train_queries"] == 0

    real_step = crash_joint_training_at(2)  # dies before step 3
    killed = ["--set", f"out_dir={tmp_path / 'killed'}"]
    with pytest.raises(KeyboardInterrupt):
        main(common + killed)
    monkeypatch.setattr(JointTrainer, "train_step", real_step)
    assert main(common + killed + ["--resume"]) == 0

    a = torch.load(run / "checkpoint.pt", weights_only=False)["trainer"]
    b = torch.load(tmp_path / "killed/smoke_train/checkpoint.pt", weights_only=False)["trainer"]
    assert a["step"] == b["step"] == 4
    for key, value in a["nets"]["digit_net"].items():
        assert torch.equal(value, b["nets"]["digit_net"][key]), key
    straight = json.loads((run / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed/smoke_train/metrics.json").read_text())
    assert straight["test_task_acc"] == resumed["test_task_acc"]
    assert straight["acc_c"] == resumed["acc_c"]


def test_unknown_task_is_a_one_line_error(capsys):
    assert main(["train", SMOKE, "--set", "task.name=sudoku"]) == 2
    err = capsys.readouterr().err
    assert "task.name = 'sudoku' is unknown; known tasks: mnist_addition" in err


def test_the_joint_run_never_imports_tasks():
    source = Path(run.__file__).read_text()
    assert "import tasks" not in source and "from tasks" not in source


def test_marginal_entropy_baseline_joins_the_loss():
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1
    gedi = GediConfig(w_gen=0.0, w_inv=0.0, w_prior=0.0, w_marginal_entropy=2.0)
    total, values = _trainer(_small_net(), images, gedi).loss(_queries(QUERIES))
    assert 0.0 <= values["marginal_entropy"] <= 1.0
    assert values["total"] == pytest.approx(values["logic"] + 2.0 * values["marginal_entropy"])
    assert "inv" not in values  # the GEDI terms stay off


def _supervised_trainer(images, augment: bool) -> JointTrainer:
    cfg = JointConfig(gedi=OFF, optim=OptimConfig(seed=3),
                      supervision=SupervisionConfig(augment=augment))  # fmt: skip
    return JointTrainer(
        LogicModel(ADDITION, {"digit_net": 10}), {"digit_net": _small_net()}, {"img": images},
        cfg, device="cpu", labelled={"digit_net": (images[:4], torch.tensor([3, 5, 0, 9]))},
    )  # fmt: skip


def test_concept_supervision_on_augmented_views_of_the_labelled_images():
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(5)) * 2 - 1
    labels = torch.tensor([3, 5, 0, 9])
    plain = _supervised_trainer(images, augment=False)
    _, values = plain.loss(_queries(QUERIES))
    net = plain.nets["digit_net"]
    expected_plain = F.cross_entropy(net(images[:4]), labels)
    assert values["concept_ce"] == pytest.approx(float(expected_plain.detach()), rel=1e-6)

    trainer = _supervised_trainer(images, augment=True)
    _, values = trainer.loss(_queries(QUERIES))
    views = random_view(images[:4], AugmentConfig(), torch.Generator().manual_seed(3 + 7))
    expected = F.cross_entropy(trainer.nets["digit_net"](views), labels)  # same net weights
    assert values["concept_ce"] == pytest.approx(float(expected.detach()), rel=1e-6)
    assert values["concept_ce"] != pytest.approx(float(expected_plain.detach()))  # not the images

    resumed = _supervised_trainer(images, augment=True)  # the views continue after a resume
    resumed.load_state_dict(trainer.state_dict())
    after_resume = resumed.loss(_queries(QUERIES))[1]["concept_ce"]
    assert after_resume == trainer.loss(_queries(QUERIES))[1]["concept_ce"]


def test_logic_view_augmented_feeds_the_logic_a_random_view_of_each_image():
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(6)) * 2 - 1
    queries = _queries(QUERIES)
    cfg = JointConfig(gedi=OFF, optim=OptimConfig(seed=2, logic_view="augmented"))
    trainer = JointTrainer(
        CompiledLogic(ADDITION, {"digit_net": 10}), {"digit_net": _small_net()}, {"img": images},
        cfg, device="cpu",
    )  # fmt: skip
    _, values = trainer.loss(queries)
    routes = {"digit_net": tensor_keys(queries)}
    seen = trainer.images(routes["digit_net"])
    views = random_view(seen, AugmentConfig(), torch.Generator().manual_seed(2 + 7))
    clean_tables, _ = trainer.forward_tables(routes, {"digit_net": seen})
    view_tables, _ = trainer.forward_tables(routes, {"digit_net": views})
    on_views = logic_loss(*trainer.logic.query_probs(queries, view_tables))
    on_images = logic_loss(*trainer.logic.query_probs(queries, clean_tables))
    assert values["logic"] == pytest.approx(float(on_views.detach()), rel=1e-6)
    assert abs(values["logic"] - float(on_images.detach())) > 1e-4  # not the images themselves
