"""Bad input and damaged state: every class is a one-line error or is recovered (see
docs/reliability.md). Fast and offline: no MNIST, temp folders only."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

import gedi_nesy.files as files
from gedi_nesy.bench.plan import (
    BenchConfig,
    Trial,
    check_finished_configs,
    is_finished,
    trial_dir,
    trials,
)
from gedi_nesy.config import GediRunConfig, NesyRunConfig
from gedi_nesy.errors import ConfigError, DataError, StorageError, TrainingError
from gedi_nesy.gedi.sgld import sgld_sample
from gedi_nesy.schema import load_config, to_dict
from gedi_nesy.train.checkpoint import STRUCTURE, load_checkpoint, read_checkpoint, rng_state
from gedi_nesy.train.runtime import atomic_write_text, make_run_dir, save_checkpoint
from gedi_nesy.train.steplog import StepLog

# --------------------------------------------------------------------------- checkpoints


class _Planted:
    """Unpickling this runs code: it writes a marker file (a stand-in for anything worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_planted_pickle_is_refused_without_running(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "checkpoint.pt"
    torch.save({"format": 3, "payload": _Planted(marker)}, path)
    assert not marker.exists()
    with pytest.raises(TrainingError, match="holds objects other than tensors and plain values"):
        load_checkpoint(path)
    assert not marker.exists()  # the code in the file never ran
    with open(path, "wb") as f:  # a bare pickle, not a torch zip file
        pickle.dump(_Planted(marker), f)
    with pytest.raises(TrainingError):
        load_checkpoint(path)
    assert not marker.exists()


def _good_state() -> dict:
    cfg = GediRunConfig()
    fit = {"best_val": -1.0, "bad_evals": 0, "best_nets": None, "stopped_early": False}
    return {"format": 3, "trainer": {"step": 1}, "scheduler": {}, "fit": fit, "hooks": [],
            "rng": rng_state(), "config": to_dict(cfg)}  # fmt: skip


def test_a_good_checkpoint_loads_with_weights_only(tmp_path):
    save_checkpoint(tmp_path / "c.pt", _good_state())
    assert read_checkpoint(tmp_path / "c.pt", GediRunConfig())["trainer"] == {"step": 1}


@pytest.mark.parametrize(
    "where", [(k,) for k in STRUCTURE if k != "format"]
    + [(k, inner) for k, (_, keys) in STRUCTURE.items() for inner in keys],
    ids=".".join,
)  # fmt: skip
def test_a_checkpoint_lacking_a_key_names_it(tmp_path, where):
    state = _good_state()
    node = state
    for part in where[:-1]:
        node = node[part]
    del node[where[-1]]
    save_checkpoint(tmp_path / "c.pt", state)
    with pytest.raises(TrainingError, match=f"'{'.'.join(where)}'"):
        read_checkpoint(tmp_path / "c.pt", GediRunConfig())


def test_a_checkpoint_with_other_hooks_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c.pt", _good_state())
    with pytest.raises(TrainingError, match="holds 0 step hooks, the run has 1"):
        read_checkpoint(tmp_path / "c.pt", GediRunConfig(), n_hooks=1)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", ".hidden", "", "a\\b", "a\x00b"])
@pytest.mark.parametrize("cls", [NesyRunConfig, GediRunConfig])
def test_a_run_name_cannot_leave_out_dir(cls, name):
    with pytest.raises(ConfigError, match="is one folder name inside out_dir"):
        load_config(None, cls, [f"name={name}"] if name else ["name=''"])


@pytest.mark.parametrize("change", [{"name": "../x"}, {"methods": {"../x": {}}}])
def test_a_bench_or_method_name_cannot_leave_out_dir(tmp_path, change):
    cfg = BenchConfig(**{"out_dir": str(tmp_path), "methods": {"dpl": {}}, **change})
    with pytest.raises(ConfigError, match="is one folder name inside out_dir"):
        trials(cfg)


# --------------------------------------------------------------------------- every setting


def _numeric_fields(cls: type) -> list[tuple[str, type]]:
    """(dotted key, int or float) of every number setting of a run config."""
    out = []
    for section, hint in typing.get_type_hints(cls).items():
        if not dataclasses.is_dataclass(hint):
            continue
        for name, inner in typing.get_type_hints(hint).items():
            options = (
                set(typing.get_args(inner)) - {type(None)} if typing.get_args(inner) else {inner}
            )
            if typing.get_origin(inner) is not tuple and options in ({int}, {float}):
                out.append((f"{section}.{name}", options.pop()))
    return out


FIELDS = sorted(set(_numeric_fields(NesyRunConfig)) | set(_numeric_fields(GediRunConfig)))
ZERO_REFUSED = {
    "model.k", "model.width", "model.feature_dim", "model.proj_dim", "model.tau",
    "model.clusters_per_value", "sgld.buffer_size", "sgld.n_steps", "sgld.max_abs_energy",
    "gedi.swav_temperature", "gedi.sinkhorn_epsilon", "gedi.sinkhorn_iters", "optim.epochs",
    "optim.max_steps", "optim.batch_size", "optim.lr", "optim.threads", "optim.log_every",
    "optim.checkpoint_every", "logic.eval_batch", "data.n_train", "data.n_test", "data.n_ood",
}  # fmt: skip


def _cls(key: str) -> type:
    return GediRunConfig if key.startswith("data.") else NesyRunConfig


def test_the_field_list_is_complete():
    assert len(FIELDS) >= 45 and ZERO_REFUSED <= {k for k, _ in FIELDS}


@pytest.mark.parametrize(("key", "kind"), FIELDS, ids=[k for k, _ in FIELDS])
def test_every_number_setting_refuses_negative_and_nan(key, kind):
    with pytest.raises(ConfigError, match=f"^{key} = -1"):
        load_config(None, _cls(key), [f"{key}=-1"])
    if kind is float:
        with pytest.raises(ConfigError, match=f"^{key} = nan"):
            load_config(None, _cls(key), [f"{key}=.nan"])


@pytest.mark.parametrize("key", sorted(ZERO_REFUSED))
def test_zero_is_refused_where_it_means_nothing(key):
    with pytest.raises(ConfigError, match=f"^{key} = 0"):
        load_config(None, _cls(key), [f"{key}=0"])


@pytest.mark.parametrize(
    "item", ["optim.seed=4294967296", "augment.scale=[0, 1]", "augment.scale=[1.2, 0.9]",
             "sgld.reinit_freq=1.5", "optim.relabel_min_share=2"],
)  # fmt: skip
def test_out_of_range_values_are_refused(item):
    with pytest.raises(ConfigError, match=f"^{item.split('=')[0]} = "):
        load_config(None, NesyRunConfig, [item])


@pytest.mark.parametrize(
    ("params", "key"),
    [({"n_test": -3}, "task.n_test"), ({"n_val": -5}, "task.n_val"),
     ({"n_train": 0}, "task.n_train"), ({"n_unlabelled": -1}, "task.n_unlabelled"),
     ({"n_digits": 0}, "task.n_digits"), ({"seed": -1}, "task.seed")],
)  # fmt: skip
def test_task_counts_are_checked_before_any_data_is_read(params, key):
    from tasks.mnist_addition import build

    with pytest.raises(ConfigError, match=f"^{key} = "):
        build({"name": "mnist_addition", **params}, "/nonexistent")


# --------------------------------------------------------------------------- file system


def test_a_file_where_the_run_folder_should_be_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("")
    with pytest.raises(StorageError, match="cannot create the run folder .* choose another"):
        make_run_dir(tmp_path / "runs" / "x", {})


def test_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    with pytest.raises(StorageError, match=r"cannot write .*a\.txt \(Permission denied\)"):
        atomic_write_text(tmp_path / "a.txt", "x")


def test_an_unreadable_data_folder_is_one_line(tmp_path, monkeypatch):
    from gedi_nesy.data import load_images

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "is_file", denied)
    with pytest.raises(DataError, match="cannot look into .* make the data folder readable"):
        load_images("mnist", "train", tmp_path)


def test_atomic_files_get_the_umask_permissions_and_stale_temps_go(tmp_path):
    old = os.umask(0o022)
    files._umask.cache_clear()
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / ".checkpoint.pt.abcd1234.tmp").write_bytes(b"torn")  # left by a killed write
        (run / ".keep.txt").write_text("not ours")
        make_run_dir(run, {"a": 1})
        assert (run / "config.yaml").stat().st_mode & 0o777 == 0o644
        assert sorted(p.name for p in run.iterdir()) == [".keep.txt", "argv.txt", "config.yaml"]
    finally:
        os.umask(old)
        files._umask.cache_clear()


# --------------------------------------------------------------------------- damaged state


def _log(path: Path, text: str) -> list[int]:
    path.write_text(text)
    StepLog(path, resume_step=2)
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    rows = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    assert _log(tmp_path / "log.jsonl", rows + '{"step": 4, "lo') == [1, 2]
    with pytest.raises(TrainingError, match="line 2 is damaged"):
        _log(tmp_path / "log.jsonl", '{"step": 1}\n{"ste\n{"step": 2}\n')


def test_a_damaged_metrics_file_means_the_trial_is_not_finished(tmp_path):
    cfg = BenchConfig(out_dir=str(tmp_path), methods={"dpl": {}}, seeds=[0])
    trial = Trial("dpl", None, 0)
    trial_dir(cfg, trial).mkdir(parents=True)
    for text, finished in [('{"acc": 1.0}', True), ('{"acc": 1.', False), ("[1]", False)]:
        (trial_dir(cfg, trial) / "metrics.json").write_text(text)
        assert is_finished(cfg, trial) is finished


def test_a_damaged_config_of_a_finished_trial_is_one_line(tmp_path):
    cfg = BenchConfig(out_dir=str(tmp_path), methods={"dpl": {}}, seeds=[0])
    folder = trial_dir(cfg, Trial("dpl", None, 0))
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    (folder / "config.yaml").write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="config.yaml is damaged; delete"):
        check_finished_configs(cfg, trials(cfg))


def test_an_altered_circuit_cache_file_is_a_miss(tmp_path):
    from gedi_nesy.logic.circuit import Circuit
    from gedi_nesy.logic.template import CircuitCache

    arrays = {name: np.zeros(2, dtype=np.int64) for name in (
        "consts", "leaf_atom", "leaf_class", "atom_network", "atom_input", "op_kind", "op_const",
        "op_level", "term_op", "term_a", "term_b", "term_coef", "outputs")}  # fmt: skip
    circuit = Circuit(template="t", provable=True, output_names=np.array(["a", "b"]), **arrays)
    cache = CircuitCache(tmp_path, "p.", sdd_auto_gc=True)
    path = cache.store(circuit)
    assert path.stat().st_mode & 0o777 == 0o666 & ~files._umask()  # not mkstemp's 0600
    assert cache.load("t") is not None
    with np.load(path) as stored:
        altered = dict(stored)
    altered["term_coef"] = np.ones(2, dtype=np.int64)  # still a valid archive, other numbers
    with open(path, "wb") as f:
        np.savez(f, **altered)
    assert cache.load("t") is None  # recompiled and rewritten by the caller


@pytest.mark.parametrize(("first_bad", "advice"), [(0, "optim.lr"), (1, "sgld.step_size")])
def test_energy_advice_names_the_real_cause(first_bad, advice):
    calls = []

    def energy(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        scale = math.inf if len(calls) > first_bad else 1.0
        return (x * scale).sum(-1)  # (B,)

    with pytest.raises(TrainingError, match=f"SGLD step {first_bad}: .*lower {advice}"):
        sgld_sample(energy, torch.ones(2, 3), n_steps=3, step_size=1.0, noise_std=0.0,
                    generator=torch.Generator().manual_seed(0), max_abs_energy=1e4)  # fmt: skip
