"""Running a bench, ``gedi-nesy bench CONFIG``: its trials as Ray tasks, then its report.

Every trial (:mod:`gedi_nesy.bench.plan`) is a Ray task that runs ``gedi-nesy train`` in a process
of its own (:mod:`gedi_nesy.bench.trial`), reserving the trial's CPUs (``optim.threads``) and, for
a CUDA trial, a GPU or a share of one. Without an address the bench starts a local Ray runtime
and runs ``jobs`` trials at a time; with one (or ``RAY_ADDRESS``) it joins that cluster, whose
nodes must see the bench folder at the same path. The bench folder is the single source of truth:
a rerun skips finished trials and resumes interrupted ones from their checkpoints, and a trial in
flight holds a lock there, so two drivers share out the trials instead of running one twice. A
worker or node that dies mid-trial costs that trial its steps since its last checkpoint: Ray
retries it and it resumes. A trial that fails on its own is reported, not retried. When the
trials are done the bench writes its report (:mod:`gedi_nesy.bench.report`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import yaml
from tqdm import tqdm

from gedi_nesy.bench.plan import (
    BenchConfig,
    Trial,
    bench_dir,
    check_finished_configs,
    is_finished,
    trials,
)
from gedi_nesy.bench.report import write_report
from gedi_nesy.bench.trial import Outcome, TrialKilled, run_trial, trial_resources, worker_of
from gedi_nesy.errors import ConfigError
from gedi_nesy.schema import to_dict
from gedi_nesy.train.runtime import atomic_write_json, atomic_write_text

__all__ = ["BenchConfig", "run_bench", "run_trial"]

POLL_S = 1.0  # seconds between progress-bar refreshes while trials run
LOOPBACK = "127.0.0.1"  # the local runtime's address: nothing outside this machine reaches it


def connect(address: str | None, num_cpus: int) -> bool:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a local Ray runtime
    with ``num_cpus`` logical CPUs, listening on 127.0.0.1 only; nothing when this process is
    already connected.

    Args:
        address: ``host:port`` of a cluster's head, or None.
        num_cpus: the local runtime's CPUs (unused with an address).

    Returns:
        Whether this call connected (and so the caller disconnects when done).

    Raises:
        ConfigError: no Ray cluster answers at the address.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:  # a runtime of this machine alone: it listens on loopback only
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"--address {address}: no Ray cluster answers there ({str(exc).splitlines()[0]}); "
            "start one with `ray start --head`, or leave --address and RAY_ADDRESS unset to "
            "run on this machine"
        ) from None
    return True


def _attempt(cfg: BenchConfig, trial: Trial, cwd: str) -> Outcome:
    """The Ray task of one trial: run it on this node."""
    return run_trial(cfg, trial, ray.get_runtime_context().get_node_id()[:8], cwd)


def _check_feasible(name: str, resources: Mapping[str, float]) -> None:
    """Refuse a trial that no node of the cluster could ever run (Ray would wait forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for key, kind, setting in (("num_cpus", "CPU", "optim.threads"),
                               ("num_gpus", "GPU", "optim.device")):  # fmt: skip
        most = max((n.get(kind, 0) for n in nodes), default=0)
        if resources[key] > most:
            raise ConfigError(
                f"bench trial {name} needs {resources[key]:g} {kind}s ({setting}), but the "
                f"largest Ray node has {most:g}; lower {setting} or add a node that has them"
            )


def _outcome(ref: ray.ObjectRef, trial: Trial) -> Outcome:
    """The trial's outcome, or ``failed`` when Ray gave up on it (its worker kept dying)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return Outcome(trial.name, "failed", error=f"trial {trial.name} failed: {reason}")


def _status(
    cfg: BenchConfig, done: Sequence[Outcome], flight: Iterable[Trial], since: float
) -> str:
    """The progress bar's text: trials done / running / failed and the trials per node."""
    nodes = Counter(o.node for o in done if o.node and o.status == "done")
    running = 0
    for trial in flight:
        worker = worker_of(cfg, trial)
        if worker is not None and worker["mtime"] >= since:
            running += 1
            nodes[worker["node"]] += 1
    failed = sum(o.status == "failed" for o in done)
    ok = sum(o.status == "done" for o in done)
    per_node = ", ".join(f"{node} {n}" for node, n in sorted(nodes.items()))
    text = f"done {ok}, running {running}, failed {failed}"
    return f"{text} | nodes: {per_node}" if nodes else text


def _schedule(
    cfg: BenchConfig,
    pending: Sequence[Trial],
    limit: int,
    options: Callable[[Trial], dict[str, Any]],
    bar: tqdm,
) -> list[Outcome]:
    """Submit the trials as Ray tasks, at most ``limit`` in flight, in order; collect outcomes."""
    task = ray.remote(_attempt)
    cwd, since = str(Path.cwd()), time.time() - 1.0
    queue, flight, outcomes = list(pending), {}, []
    while queue or flight:
        while queue and len(flight) < limit:
            trial = queue.pop(0)
            flight[task.options(**options(trial)).remote(cfg, trial, cwd)] = trial
        ready, _ = ray.wait(list(flight), num_returns=1, timeout=POLL_S)
        outcomes += [_outcome(ref, flight.pop(ref)) for ref in ready]
        bar.set_postfix_str(_status(cfg, outcomes, flight.values(), since), refresh=False)
        bar.update(len(ready))
        bar.refresh()
    return outcomes


def _run_on_ray(
    cfg: BenchConfig, pending: Sequence[Trial], jobs: int | None, address: str | None,
    gpus: float, retries: int, bar: tqdm,
) -> list[Outcome]:  # fmt: skip
    """Connect to Ray, check every trial fits a node, run them, disconnect."""
    cpus = {t.name: trial_resources(cfg, t, gpus, 0)["num_cpus"] for t in pending}
    local = (jobs or 1) * max(cpus.values())
    started = connect(address, max(os.cpu_count() or 1, local))
    try:
        on_cluster = ray.cluster_resources().get("GPU", 0)
        resources = {t.name: trial_resources(cfg, t, gpus, on_cluster) for t in pending}
        for name, need in resources.items():
            _check_feasible(name, need)
        retry = {"max_retries": retries, "retry_exceptions": [TrialKilled]}
        limit = jobs or (1 if address is None and started else len(pending))
        return _schedule(cfg, pending, limit, lambda t: resources[t.name] | retry, bar)
    finally:
        if started:
            ray.shutdown()


def run_bench(
    cfg: BenchConfig,
    *,
    jobs: int | None = None,
    address: str | None = None,
    gpus_per_trial: float = 1.0,
    retries: int = 3,
    audit: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the trials that are not finished as Ray tasks, then write the report.

    Args:
        cfg: the bench config.
        jobs: at most this many trials at once (None: 1 on a local runtime, no bound on a
            cluster but its resources).
        address: a Ray cluster to join (None: ``RAY_ADDRESS``, else a local runtime).
        gpus_per_trial: the share of a GPU each CUDA trial reserves (0.5 packs two on a GPU).
        retries: times Ray reruns a trial whose worker or node died.
        audit: the task's shortcut audit (:func:`gedi_nesy.shortcuts.audit.audit_to_dict`), or None.
        progress: show a progress bar over trials.

    Returns:
        ``{"trials", "skipped", "failed": [messages], "elsewhere": [names of the trials
        another process was running, so this one did not, and had not finished by the
        report], "nodes": {node: trials it finished}, "folder"}``.

    Raises:
        ConfigError: ``jobs`` < 1, ``gpus_per_trial`` not in (0, 1] or above 1 and whole,
            ``retries`` < 0, the config is invalid, a finished trial was made under another
            config, a trial needs more than any node has, or no cluster answers at ``address``
            (all checked before any trial runs).
    """
    _check_options(jobs, gpus_per_trial, retries)
    all_trials = trials(cfg)
    check_finished_configs(cfg, all_trials)
    out = _write_plan(cfg, audit)
    cfg = replace(cfg, out_dir=str(Path(cfg.out_dir).resolve()))  # the path every node sees
    pending = [t for t in all_trials if not is_finished(cfg, t)]
    bar = tqdm(total=len(all_trials), initial=len(all_trials) - len(pending), disable=not progress,
               desc=cfg.name, unit="trial")  # fmt: skip
    outcomes = []
    if pending:
        outcomes = _run_on_ray(cfg, pending, jobs, address, gpus_per_trial, retries, bar)
    bar.close()
    write_report(cfg, audit)
    finished = {t.name for t in all_trials if is_finished(cfg, t)}
    return {
        "trials": len(all_trials),
        "skipped": len(all_trials) - len(pending),
        "failed": [o.error for o in outcomes if o.status == "failed"],
        "elsewhere": [
            o.trial for o in outcomes if o.status == "elsewhere" and o.trial not in finished
        ],
        "nodes": dict(Counter(o.node for o in outcomes if o.status == "done" and o.node)),
        "folder": str(out),
    }


def _write_plan(cfg: BenchConfig, audit: Mapping[str, Any] | None) -> Path:
    """Create the bench folder with ``bench.yaml`` (and ``audit.json``); returns the folder."""
    out = bench_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if audit is not None:
        atomic_write_json(out / "audit.json", dict(audit))
    return out.resolve()


def _check_options(jobs: int | None, gpus: float, retries: int) -> None:
    """Refuse scheduling options no run could honour."""
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs {jobs}: run at least 1 trial at a time")
    if gpus <= 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise ConfigError(
            f"--gpus-per-trial {gpus:g}: give a share of one GPU in (0, 1], e.g. 0.5, or a "
            "whole number of GPUs"
        )
    if retries < 0:
        raise ConfigError(f"--retries {retries}: give 0 (never retry) or more")
