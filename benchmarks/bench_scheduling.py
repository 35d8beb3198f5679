"""Bench scheduling: wall time of one 12-trial bench run by Ray in three ways, and Ray's overhead.

The bench is 2 methods x 6 seeds of tiny ``mnist_half`` trials (2 training steps each, so a trial
is mostly process start, data loading and evaluation). It runs, each time in a fresh folder:

* ``plain``: the 12 trial configs as ``python -m gedi_nesy train`` processes one after another,
  no Ray (the baseline of the overhead);
* ``local-1`` / ``local-2``: ``gedi-nesy bench --jobs 1`` / ``--jobs 2`` on a local Ray runtime;
* ``cluster``: ``gedi-nesy bench --address`` on a two-node loopback cluster (head plus one node,
  one CPU each, started before the clock and stopped after).

Ray's fixed overhead per trial is (``local-1`` - ``plain``) / 12: runtime start and stop, the
worker, the task and its lock, spread over the trials. Example (``GEDI_NESY_DATA`` set):

    python benchmarks/bench_scheduling.py --out /tmp/sched
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from gedi_nesy.bench.plan import BenchConfig, trial_config, trials
from gedi_nesy.schema import load_config

SEEDS = list(range(6))
METHODS = "{dpl: {gedi.w_inv: 0, gedi.w_prior: 0}, gedi: {}}"


def write_bench(folder: Path) -> Path:
    """The 12-trial bench config, writing under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "bench.yaml"
    config.write_text(
        f"name: sched\nout_dir: {folder}\nseeds: {SEEDS}\n"
        "base:\n"
        "  task: {name: mnist_half, n_train_per_world: 2, n_val_per_world: 1,\n"
        "         n_test_per_world: 1}\n"
        "  model: {width: 4}\n"
        "  optim: {batch_size: 7}\n"
        f"  logic: {{cache_dir: {folder.parent / 'cc'}}}\n"
        f"methods: {METHODS}\n"
    )
    return config


def timed(cmd: list[str]) -> float:
    """Seconds ``cmd`` took; it must succeed."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def plain(folder: Path) -> float:
    """The trials as plain ``train`` processes in sequence, no Ray."""
    cfg = load_config(write_bench(folder), BenchConfig)
    start = time.perf_counter()
    for trial in trials(cfg):
        path = folder / f"{trial.name}.yaml"
        path.write_text(yaml.safe_dump(trial_config(cfg, trial), sort_keys=False))
        timed([sys.executable, "-m", "gedi_nesy", "train", str(path), "--no-progress"])
    return time.perf_counter() - start


def bench(folder: Path, *options: str) -> float:
    """``gedi-nesy bench`` with ``options`` on a fresh folder."""
    config = str(write_bench(folder))
    return timed([sys.executable, "-m", "gedi_nesy", "bench", config, "--no-progress", *options])


def on_cluster(folder: Path) -> float:
    """The bench on a two-node loopback cluster (one CPU each); the cluster is not timed."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False  # every address stays 127.0.0.1 (loopback only),
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # here and in the bench's process
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        return bench(folder, "--address", cluster.address)  # the bench runs in a subprocess
    finally:
        cluster.shutdown()


def main() -> None:
    """Run the four timings, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temp one)")
    out = Path(parser.parse_args().out or tempfile.mkdtemp())
    bench(
        out / "warm", "--jobs", "2", "--set", "seeds=[0]"
    )  # compiles the circuits into the shared cache once, untimed
    seconds = {
        "plain": plain(out / "plain"),
        "local-1": bench(out / "local1", "--jobs", "1"),
        "local-2": bench(out / "local2", "--jobs", "2"),
        "cluster": on_cluster(out / "cluster"),
    }
    n = len(SEEDS) * 2
    print("| run | wall s | s / trial |\n|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.1f} | {s / n:.2f} |")
    print(f"\nRay overhead per trial: {(seconds['local-1'] - seconds['plain']) / n:.2f} s")


if __name__ == "__main__":
    main()
