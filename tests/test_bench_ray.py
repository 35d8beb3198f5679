"""Trials scheduled by Ray: a local runtime, a two-node loopback cluster, a worker killed mid-trial.

Each test runs real (tiny) trials, so they are marked slow. The cluster listens on 127.0.0.1 and
is shut down by the test, also when it fails.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from gedi_nesy.bench.plan import BenchConfig, trials
from gedi_nesy.bench.run import connect, run_bench
from gedi_nesy.bench.trial import trial_resources
from gedi_nesy.cli import main
from gedi_nesy.errors import ConfigError
from gedi_nesy.schema import from_dict

TIMING = ("train_seconds", "queries_per_s")  # wall-clock columns: differ run to run


def _bench(folder: Path, methods: str, optim: str = "batch_size: 7") -> str:
    """A tiny bench config (trials of a few steps) writing under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "bench.yaml"
    config.write_text(
        f"name: tiny\nout_dir: {folder}\nseeds: [0, 1]\n"
        "base:\n"
        "  task: {name: mnist_half, n_train_per_world: 2, n_val_per_world: 1,\n"
        "         n_test_per_world: 1}\n"
        "  model: {width: 4}\n"
        f"  optim: {{{optim}}}\n"
        f"  logic: {{cache_dir: {folder.parent / 'cc'}}}\n"
        f"methods: {methods}\n"
    )
    return str(config)


def _results(folder: Path) -> list[dict[str, str]]:
    """results.csv without its wall-clock columns."""
    rows = csv.DictReader(io.StringIO((folder / "tiny/results.csv").read_text()))
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _workers(folder: Path) -> dict[str, dict]:
    """Trial -> the node and worker pid of its last attempt."""
    paths = (folder / "tiny/trials").glob("*.worker")
    return {p.stem: json.loads(p.read_text()) for p in paths}


METHODS = "{dpl: {gedi.w_inv: 0, gedi.w_prior: 0}, gedi: {}}"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """The tiny bench (2 methods x 2 seeds) on a local Ray runtime, two trials at a time."""
    folder = tmp_path_factory.mktemp("local")
    assert main(["bench", _bench(folder, METHODS), "--jobs", "2", "--no-progress"]) == 0
    assert not ray.is_initialized()  # the bench stopped the runtime it started
    return folder


@pytest.mark.slow  # about a minute: four real trials on a local Ray runtime
@pytest.mark.needs_data
def test_a_local_bench_runs_every_trial_once_on_one_node(local_run):
    rows = _results(local_run)
    assert [r["trial"] for r in rows] == ["dpl-s0", "dpl-s1", "gedi-s0", "gedi-s1"]
    assert {r["steps"] for r in rows} == {"2"}
    workers = _workers(local_run)
    assert sorted(workers) == ["dpl-s0", "dpl-s1", "gedi-s0", "gedi-s1"]
    assert len({w["node"] for w in workers.values()}) == 1
    for trial in workers:
        log = (local_run / f"tiny/trials/{trial}.log").read_text()
        assert log.count("== node ") == 1 and log.count("run folder:") == 1  # one attempt


@pytest.mark.slow  # about a minute and a half: a loopback cluster, then four real trials
@pytest.mark.needs_data
def test_a_two_node_loopback_cluster_gives_the_local_results(local_run, tmp_path, monkeypatch):
    # Ray's single-machine mode: every address stays 127.0.0.1 (else the driver would rewrite
    # the head's 127.0.0.1 to this machine's outward address)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster()
    try:
        head = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
        cluster.add_node(**head)
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        config = _bench(tmp_path, METHODS)
        assert main(["bench", config, "--address", cluster.address, "--no-progress"]) == 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert _results(tmp_path) == _results(local_run)
    assert len({w["node"] for w in _workers(tmp_path).values()}) == 2  # both nodes ran trials


@pytest.mark.slow  # about a minute: two real trials of 40 steps, one of them killed and retried
@pytest.mark.needs_data
def test_a_killed_worker_costs_its_trial_the_steps_since_its_checkpoint(tmp_path):
    # a and b are one config under two names: b is a's uninterrupted run
    config = _bench(tmp_path, "{a: {}, b: {}}", "batch_size: 7, epochs: 20, checkpoint_every: 2")
    bench = subprocess.Popen(
        [sys.executable, "-m", "gedi_nesy", "bench", config, "--jobs", "2", "--no-progress",
         "--set", "seeds=[0]"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    trials = tmp_path / "tiny/trials"
    try:
        deadline = time.monotonic() + 120
        while not (trials / "a-s0/checkpoint.pt").is_file():
            assert time.monotonic() < deadline and bench.poll() is None, "no checkpoint of a-s0"
            time.sleep(0.05)
        assert not (trials / "a-s0/metrics.json").exists()  # killed mid-trial, after a checkpoint
        os.kill(_workers(tmp_path)["a-s0"]["pid"], signal.SIGKILL)
        out, _ = bench.communicate(timeout=300)
    finally:
        bench.kill()
    assert bench.returncode == 0, out
    assert "2 of 2 trials finished" in out
    a, b = (json.loads((trials / f"{t}-s0/metrics.json").read_text()) for t in "ab")
    assert {k: v for k, v in a.items() if k not in TIMING} == {
        k: v for k, v in b.items() if k not in TIMING
    }
    assert a["steps"] == 40
    assert "--resume" in (trials / "a-s0/argv.txt").read_text()
    log_a, log_b = ((trials / f"{t}-s0.log").read_text() for t in "ab")
    assert log_a.count("== node ") == 2 and log_b.count("== node ") == 1  # a ran twice
    assert log_a.count("run folder:") == 1 and log_b.count("run folder:") == 1  # finished once


def test_bad_scheduling_options_are_refused_before_ray_starts(tmp_path):
    cfg = from_dict(BenchConfig, {"out_dir": str(tmp_path), "methods": {"dpl": {}}})
    for kw, message in [
        ({"jobs": 0}, "--jobs 0: run at least 1"),
        ({"gpus_per_trial": 1.5}, "--gpus-per-trial 1.5: give a share of one GPU in"),
        ({"gpus_per_trial": 0}, "--gpus-per-trial 0: give a share"),
        ({"retries": -1}, "--retries -1: give 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            run_bench(cfg, progress=False, **kw)
    assert not ray.is_initialized() and not (tmp_path / "bench").exists()


def test_a_trial_reserves_its_threads_and_a_gpu_share_when_it_runs_on_cuda(tmp_path):
    methods = {
        "cpu4": {"optim.threads": 4, "optim.device": "cpu"},
        "cuda": {"optim.device": "cuda"},
        "auto": {},
    }
    cfg = from_dict(BenchConfig, {"out_dir": str(tmp_path), "methods": methods, "seeds": [0]})
    cpu4, cuda, auto = trials(cfg)
    assert trial_resources(cfg, cpu4, 0.5, 8) == {"num_cpus": 4, "num_gpus": 0}
    assert trial_resources(cfg, cuda, 0.5, 0) == {"num_cpus": 1, "num_gpus": 0.5}
    assert trial_resources(cfg, auto, 1.0, 2) == {"num_cpus": 1, "num_gpus": 1.0}
    assert trial_resources(cfg, auto, 1.0, 0) == {"num_cpus": 1, "num_gpus": 0}


def test_an_address_where_no_cluster_answers_is_a_one_line_error(monkeypatch):
    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nmore detail")

    monkeypatch.setattr(ray, "init", refuse)
    expected = r"^--address 127.0.0.1:9: no Ray cluster answers there \(Could not find any "
    with pytest.raises(ConfigError, match=expected + r"running Ray instance.\); start one"):
        connect("127.0.0.1:9", 1)
