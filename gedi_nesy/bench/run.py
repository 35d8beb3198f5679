"""Running a bench, ``gedi-nesy bench CONFIG``: its trials in processes, then its report.

Every trial (:mod:`gedi_nesy.bench.plan`) is one ``gedi-nesy train`` run in its own process. A
trial is finished when its ``metrics.json`` exists (written atomically at the end of the run), so
a rerun skips finished trials and resumes interrupted ones from their checkpoints: a killed bench
loses at most the steps since the last checkpoint of the trials in flight. A trial in flight is
locked, so two bench processes over one folder share out the trials instead of running one
twice. When the trials are done the bench writes its report (:mod:`gedi_nesy.bench.report`).
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import yaml
from tqdm import tqdm

from gedi_nesy.bench.plan import (
    BenchConfig,
    Trial,
    bench_dir,
    check_finished_configs,
    is_finished,
    trial_config,
    trial_dir,
    trials,
)
from gedi_nesy.bench.report import write_report
from gedi_nesy.errors import ConfigError, TrainingError
from gedi_nesy.schema import to_dict
from gedi_nesy.train.runtime import atomic_write_json, atomic_write_text

__all__ = ["BenchConfig", "run_bench", "run_trial"]


def run_trial(cfg: BenchConfig, trial: Trial) -> bool:
    """Run one trial as ``python -m gedi_nesy train`` in a new process; resume its checkpoint.

    The trial's config is ``trials/<trial>.yaml``; its output (progress off) is appended to
    ``trials/<trial>.log``. While it runs, the bench and the training process hold an exclusive
    lock on ``trials/<trial>.lock`` (released by the system when both end, killed or not), so
    two bench processes over one folder never run a trial at once. A trial that finished after
    the bench planned it is left as it is.

    Args:
        cfg: the bench config.
        trial: one of its trials.

    Returns:
        False when another process holds the trial's lock (it was not run), else True.

    Raises:
        TrainingError: the run failed; the message names its log and quotes the last line.
    """
    if is_finished(cfg, trial):
        return True
    folder = bench_dir(cfg) / "trials"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{trial.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if is_finished(cfg, trial):  # finished by the process that held the lock before
            return True
        config = folder / f"{trial.name}.yaml"
        atomic_write_text(config, yaml.safe_dump(trial_config(cfg, trial), sort_keys=False))
        cmd = [sys.executable, "-m", "gedi_nesy", "train", str(config), "--no-progress"]
        if (trial_dir(cfg, trial) / "checkpoint.pt").is_file():
            cmd.append("--resume")
        log = folder / f"{trial.name}.log"
        with open(log, "a") as f:  # a resumed trial keeps the output of its earlier attempt
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                  pass_fds=(lock.fileno(),))  # fmt: skip
    if done.returncode != 0:
        lines = log.read_text().strip().splitlines() or ["(no output)"]
        raise TrainingError(f"trial {trial.name} failed ({log}): {lines[-1]}")
    return True


def _run_pool(
    cfg: BenchConfig, pending: Sequence[Trial], jobs: int, bar: tqdm
) -> tuple[list[str], list[Trial]]:
    """Run ``pending`` trials, ``jobs`` at a time, in order; returns the failure messages and the
    trials another process held."""
    failed: list[str] = []
    elsewhere: list[Trial] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict[Future, Trial] = {}
        queue = list(pending)
        while queue or running:
            while queue and len(running) < jobs:
                trial = queue.pop(0)
                running[pool.submit(run_trial, cfg, trial)] = trial
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                trial = running.pop(future)
                if future.exception() is not None:
                    failed.append(str(future.exception()))
                elif not future.result():
                    elsewhere.append(trial)
                bar.update(1)
                bar.set_postfix_str(trial.name)
    return failed, elsewhere


def run_bench(
    cfg: BenchConfig,
    *,
    jobs: int = 1,
    audit: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the trials that are not finished, ``jobs`` at a time, then write the report.

    Args:
        cfg: the bench config.
        jobs: trials run in parallel (each its own process with ``optim.threads`` threads).
        audit: the task's shortcut audit (:func:`gedi_nesy.shortcuts.audit.audit_to_dict`), or None.
        progress: show a progress bar over trials.

    Returns:
        ``{"trials", "skipped", "failed": [messages], "elsewhere": [names of the trials
        another process was running, so this one did not, and had not finished by the
        report], "folder"}``.

    Raises:
        ConfigError: ``jobs`` < 1, the config is invalid, or a finished trial was made under
            another config (all checked before any trial runs).
    """
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: run at least 1 trial at a time")
    all_trials = trials(cfg)
    check_finished_configs(cfg, all_trials)
    out = bench_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if audit is not None:
        atomic_write_json(out / "audit.json", dict(audit))
    pending = [t for t in all_trials if not is_finished(cfg, t)]
    bar = tqdm(total=len(all_trials), initial=len(all_trials) - len(pending), disable=not progress,
               desc=cfg.name, unit="trial")  # fmt: skip
    failed, elsewhere = _run_pool(cfg, pending, jobs, bar)
    bar.close()
    write_report(cfg, audit)
    return {
        "trials": len(all_trials),
        "skipped": len(all_trials) - len(pending),
        "failed": failed,
        "elsewhere": [t.name for t in elsewhere if not is_finished(cfg, t)],
        "folder": str(out),
    }
