"""The one fit loop on a toy trainer: run length, validation with early stopping and the best
state kept, hooks, the log, and resume."""

from __future__ import annotations

import json

import pytest
import torch

from gedi_nesy.config import GediRunConfig, OptimConfig
from gedi_nesy.errors import TrainingError
from gedi_nesy.train.checkpoint import load_checkpoint
from gedi_nesy.train.loop import Batches, FitRecord, Validation, fit, total_steps
from gedi_nesy.train.runtime import save_checkpoint


class _Toy:
    """A one-parameter trainer: each step adds its batch's mean to the parameter by SGD."""

    def __init__(self) -> None:
        self.net = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.net.weight)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=1.0)
        self.step = 0

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        self.optimizer.zero_grad()
        loss = -(self.net.weight.sum() * x.mean())  # gradient -mean(x): the weight grows by it
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"total": float(loss.detach())}

    def state_dict(self):
        return {"step": self.step, "net": self.net.state_dict(), "opt": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.step = state["step"]
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["opt"])


class _Crashing(_Toy):
    """Dies before step 6, as a killed run would (its checkpoint of step 4 is on disk)."""

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        if self.step == 5:
            raise KeyboardInterrupt
        return super().train_step(x)


class _Counter:
    """A hook that counts its calls and logs every third step."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, step, total, record):
        self.calls += 1
        return {"third": step} if step % 3 == 0 else {}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def _cfg(**optim) -> GediRunConfig:
    return GediRunConfig(name="toy", optim=OptimConfig(batch_size=2, log_every=100, **optim))


DATA = Batches(6, lambda idx, step: (torch.ones(len(idx)),), unit="things")  # 3 steps an epoch


def test_total_steps_from_epochs_and_max_steps():
    assert total_steps(OptimConfig(epochs=2, batch_size=4), 10) == 6  # ceil(10 / 4) = 3 per epoch
    assert total_steps(OptimConfig(epochs=2, max_steps=5, batch_size=4), 10) == 5
    assert total_steps(OptimConfig(epochs=None, max_steps=7, batch_size=4), 10) == 7


def test_fit_validates_stops_early_and_restores_the_best_state(tmp_path):
    scores = iter([0.2, 0.5, 0.4, 0.3, 0.9])
    toy, hook = _Toy(), _Counter()
    validation = Validation(lambda: next(scores), {"net": toy.net}, every=1, patience=2,
                            name="val_acc")  # fmt: skip
    done = fit(toy, DATA, _cfg(epochs=5), tmp_path, validation=validation, hooks=[hook],
               progress=False)  # fmt: skip
    assert (done.steps, done.best_val, done.stopped_early) == (4, 0.5, True)  # 0.4, 0.3: stop
    assert toy.net.weight.item() == 2.0  # the state of step 2, where 0.5 was scored
    assert hook.calls == 4
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]  # every step validated: every step logged
    assert [row["val_acc"] for row in log] == [0.2, 0.5, 0.4, 0.3] and log[2]["third"] == 3
    assert {"lr", "things_per_s", "total"} <= set(log[0])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the end
    saved = load_checkpoint(tmp_path / "checkpoint.pt")  # written when it stopped
    assert saved["trainer"]["step"] == 4 and saved["hooks"] == [{"calls": 4}]
    assert saved["fit"]["stopped_early"] and saved["fit"]["best_val"] == 0.5


def test_fit_resumes_to_the_same_state_and_refuses_an_earlier_checkpoint(tmp_path):
    cfg = _cfg(epochs=3, checkpoint_every=4, schedule="cosine", warmup_steps=2)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = _Toy()
    fit(straight, DATA, cfg, tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(_Crashing(), DATA, cfg, tmp_path / "b", progress=False)
    resumed = _Toy()
    assert fit(resumed, DATA, cfg, tmp_path / "b", resume=True, progress=False).first_step == 4
    assert torch.equal(resumed.net.weight, straight.net.weight) and resumed.step == 9
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in "ab")
    assert a["scheduler"] == b["scheduler"]
    old = dict(b)
    del old["format"]  # as written before the one loop
    save_checkpoint(tmp_path / "b/checkpoint.pt", old)
    with pytest.raises(TrainingError, match="was written by an earlier version of gedi-nesy"):
        fit(_Toy(), DATA, cfg, tmp_path / "b", resume=True, progress=False)


def test_forget_best_restarts_the_record():
    record, net = FitRecord(), torch.nn.Linear(1, 1)
    record.observe(0.7, {"n": net}, patience=0)
    record.forget_best()
    assert (record.best_val, record.bad_evals, record.best_nets) == (-1.0, 0, None)
    assert record.observe(0.1, {"n": net}, patience=0) == 0.1 and record.best_val == 0.1
