"""Run plumbing: checkpoints survive a crash mid-write; schedules; data order."""

from __future__ import annotations

import pytest
import torch

import gedi_nesy.train.runtime as runtime
from gedi_nesy.errors import TrainingError
from gedi_nesy.train.checkpoint import load_checkpoint
from gedi_nesy.train.loop import batch_indices, lr_factor
from gedi_nesy.train.runtime import save_checkpoint


def test_a_kill_during_a_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        f.truncate(10)  # a torn file on disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(runtime.torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp left


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot be read"):
        load_checkpoint(path)
    with pytest.raises(TrainingError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_batch_order_is_a_function_of_the_step():
    epoch0 = torch.cat([batch_indices(10, 4, seed=3, step=s) for s in range(3)])
    assert sorted(epoch0.tolist()) == list(range(10))  # one epoch: every index once
    assert torch.equal(batch_indices(10, 4, seed=3, step=4), batch_indices(10, 4, 3, 4))
    assert not torch.equal(batch_indices(10, 4, 3, 3), batch_indices(10, 4, 3, 0))


def test_lr_factors():
    assert lr_factor(0, schedule="constant", warmup_steps=4, total_steps=10) == 0.25
    assert lr_factor(7, schedule="constant", warmup_steps=4, total_steps=10) == 1.0
    assert lr_factor(4, schedule="cosine", warmup_steps=4, total_steps=10) == pytest.approx(1.0)
    assert lr_factor(10, schedule="cosine", warmup_steps=4, total_steps=10) == pytest.approx(0.1)


def test_resume_refuses_a_different_config(tmp_path):
    from gedi_nesy.train.runtime import check_resume_config

    saved = {"name": "a", "optim": {"lr": 0.001, "steps": 10}, "model": {"width": 16}}
    same = {"name": "b", "optim": {"lr": 0.001, "steps": 10}, "model": {"width": 16}}
    check_resume_config(saved, same, tmp_path / "c.pt")  # only the name differs: fine
    changed = {"name": "a", "optim": {"lr": 0.001, "steps": 10}, "model": {"width": 8}}
    with pytest.raises(TrainingError, match="was made with model.width = 16, the config now"):
        check_resume_config(saved, changed, tmp_path / "c.pt")
