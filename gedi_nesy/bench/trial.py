"""One trial on whatever node runs it: its lock, its ``gedi-nesy train`` process, its outcome.

This is what a Ray task of :mod:`gedi_nesy.bench.run` executes, on the driver's machine or on a
cluster node; it reads and writes only the bench folder (a folder every node sees at the same
path). A trial is finished when its ``metrics.json`` exists (written atomically at the end of the
run). While it runs, the task and its training process hold an exclusive lock on
``trials/<trial>.lock`` (the system releases it when both end, killed or not), so two drivers, or
two nodes, never run one trial at once. The training process dies with the task's worker (Linux:
a parent-death signal), so a retried trial resumes from its checkpoint alone.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from gedi_nesy.bench.plan import BenchConfig, Trial, bench_dir, is_finished, trial_config, trial_dir
from gedi_nesy.train.runtime import atomic_write_json, atomic_write_text

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


class TrialKilled(Exception):
    """The trial's training process was killed by a signal (its worker or node died, or the
    system ran out of memory): a fault of the machine, not of the trial, so Ray retries it."""


@dataclass(frozen=True)
class Outcome:
    """What became of one attempt at a trial: ``done`` (finished, now or before), ``elsewhere``
    (another process holds its lock) or ``failed`` (with the one-line ``error``); ``node`` is the
    Ray node that ran it, or empty."""

    trial: str
    status: str
    node: str = ""
    error: str = ""


def trial_resources(cfg: BenchConfig, trial: Trial, gpus: float, cluster_gpus: float) -> dict:
    """The Ray resources a trial reserves: ``optim.threads`` CPUs, and ``gpus`` GPUs when its
    device is ``cuda`` (or ``auto`` on a cluster that has a GPU).

    Args:
        cfg: the bench config.
        trial: one of its trials.
        gpus: the share of a GPU a CUDA trial reserves (``--gpus-per-trial``; 0.5 packs two).
        cluster_gpus: the GPUs the Ray cluster has.

    Returns:
        ``{"num_cpus": ..., "num_gpus": ...}`` for ``ray.remote(...).options``.
    """
    optim = trial_config(cfg, trial).get("optim", {})
    device = optim.get("device", "auto")
    wants_gpu = device == "cuda" or (device == "auto" and cluster_gpus > 0)
    return {"num_cpus": int(optim.get("threads", 1)), "num_gpus": gpus if wants_gpu else 0}


def _die_with_parent() -> None:
    """In the training process before it starts: get SIGKILL when the worker that started it
    dies (Linux), so a dead worker leaves no training process holding the trial's lock."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _train(cfg: BenchConfig, trial: Trial, lock_fd: int, node: str, cwd: str | None) -> int:
    """Write the trial's config and run ``python -m gedi_nesy train`` on it in ``cwd`` (resuming
    its checkpoint), its output appended to ``trials/<trial>.log``; returns its exit status."""
    folder = bench_dir(cfg) / "trials"
    config = folder / f"{trial.name}.yaml"
    atomic_write_text(config, yaml.safe_dump(trial_config(cfg, trial), sort_keys=False))
    cmd = [sys.executable, "-m", "gedi_nesy", "train", str(config), "--no-progress"]
    if (trial_dir(cfg, trial) / "checkpoint.pt").is_file():
        cmd.append("--resume")
    atomic_write_json(
        folder / f"{trial.name}.worker",
        {"node": node, "host": socket.gethostname(), "pid": os.getpid()},
    )
    with open(folder / f"{trial.name}.log", "a") as log:  # a resumed trial keeps earlier output
        log.write(f"== node {node} ({socket.gethostname()}), worker pid {os.getpid()}: "
                  f"{' '.join(cmd[1:])}\n")  # fmt: skip
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock_fd,),
                              cwd=cwd, preexec_fn=_die_with_parent)  # fmt: skip
    return done.returncode


def run_trial(cfg: BenchConfig, trial: Trial, node: str = "", cwd: str | None = None) -> Outcome:
    """Run one trial unless it is finished or another process holds it; resume its checkpoint.

    Args:
        cfg: the bench config (``out_dir`` a path every node sees).
        trial: one of its trials.
        node: the Ray node running it, for the log and the progress bar.
        cwd: the folder the training process reads the config's relative paths against (the
            driver's working folder; None: this process's).

    Returns:
        The outcome; a failed run's ``error`` names its log and quotes the last line.

    Raises:
        TrialKilled: the training process was killed by a signal (Ray retries the trial).
    """
    if is_finished(cfg, trial):
        return Outcome(trial.name, "done", node)
    folder = bench_dir(cfg) / "trials"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{trial.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return Outcome(trial.name, "elsewhere", node)
        if is_finished(cfg, trial):  # finished by the process that held the lock before
            return Outcome(trial.name, "done", node)
        code = _train(cfg, trial, lock.fileno(), node, cwd)
    if code < 0:
        raise TrialKilled(f"trial {trial.name}: its training process got signal {-code}")
    if code != 0:
        log = folder / f"{trial.name}.log"
        lines = log.read_text().strip().splitlines() or ["(no output)"]
        error = f"trial {trial.name} failed ({log}): {lines[-1]}"
        return Outcome(trial.name, "failed", node, error)
    return Outcome(trial.name, "done", node)


def worker_of(cfg: BenchConfig, trial: Trial) -> dict[str, Any] | None:
    """The node, host and worker pid of the trial's latest attempt (``trials/<trial>.worker``),
    or None when no attempt started."""
    path = bench_dir(cfg) / "trials" / f"{trial.name}.worker"
    try:
        return json.loads(path.read_text()) | {"mtime": path.stat().st_mtime}
    except (FileNotFoundError, ValueError):
        return None
