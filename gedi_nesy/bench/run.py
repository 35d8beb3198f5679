"""The comparison runner behind ``gedi-nesy bench CONFIG``: methods x data sizes x seeds.

A bench config names a base run config (the ``gedi-nesy train`` format), the methods as overrides
of it, the seeds and optionally a data-size axis. Every (method, size, seed) is a *trial*: one
``gedi-nesy train`` run in its own process, in ``<out_dir>/<name>/trials/<trial>/``. A trial is
finished when its ``metrics.json`` exists (written atomically at the end of the run), so a rerun
skips finished trials and resumes interrupted ones from their checkpoints: a killed bench loses at
most the steps since the last checkpoint of the trials in flight. A trial in flight is locked, so
two bench processes over one folder share out the trials instead of running one twice.

With ``restarts: R`` > 1 each (method, size, seed) trains R times, restart r setting
``restart_key`` (default ``optim.seed``: the model, not the data) to ``seed + 1000 r``, and the
report keeps, per seed, the restart with the highest ``select_by`` metric: by default
``train_min_usage_c``, which reads no label (see ``docs/metrics.md``). The summary gives the
selected restarts and, below, every restart as its own run.

When the trials are done, the bench writes next to them:

- ``results.csv``: one row per trial, every scalar metric of its ``metrics.json``;
- ``summary.md``: mean ± std over seeds per method (and size), the RS rate, the concept maps the
  seeds implement, and the shortcut audit when the task has one;
- ``confusion_<method>[_<size>].png``: the concept confusion matrix summed over seeds;
- ``concept_acc_vs_size.png``: raw and matched Acc(C) against the data size (with >= 2 sizes).
"""

from __future__ import annotations

import copy
import csv
import fcntl
import io
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from gedi_nesy.config import NesyRunConfig, from_dict, to_dict, with_defaults
from gedi_nesy.errors import ConfigError, TrainingError
from gedi_nesy.plots import save_confusion_png, save_panels_png
from gedi_nesy.shortcuts.metrics import rs_rate
from gedi_nesy.train.runtime import atomic_write_json, atomic_write_text, config_difference

# metric key in metrics.json -> column heading of summary.md
DEFAULT_COLUMNS = {
    "test_task_acc": "Acc(Y)",
    "acc_c": "raw Acc(C)",
    "acc_c_matched": "matched Acc(C)",
    "nmi_c": "NMI(C)",
    "f1_c_macro": "F1(C) macro",
    "collapse_hard": "Cls hard",
    "train_min_usage_c": "min usage (train, no labels)",
    "ood_task_acc": "OOD Acc(Y)",
    "ood_acc_c": "OOD raw Acc(C)",
    "train_seconds": "train s",
}


@dataclass
class BenchConfig:
    """A comparison: ``base`` run config, ``methods`` as overrides of it, seeds and sizes.

    Method overrides are mappings of dotted keys (``gedi.w_inv: 0``) or nested sections
    (``gedi: {w_inv: 0}``). Each seed sets every key in ``seed_keys``; each size sets
    ``size_key``. Everything else a trial needs comes from ``base``.
    """

    name: str = "bench"
    out_dir: str = "runs"
    base: dict[str, Any] = field(default_factory=dict)  # a `gedi-nesy train` config mapping
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> overrides of base
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_keys: list[str] = field(default_factory=lambda: ["task.seed", "optim.seed"])
    size_key: str | None = None  # dotted key of the data-size axis, e.g. task.n_train
    sizes: list[int] = field(default_factory=list)  # its values; empty: base's own size
    columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    restarts: int = 1  # runs per (method, size, seed); the report keeps one, by select_by
    restart_key: str = "optim.seed"  # restart r sets it to seed + RESTART_STRIDE * r
    select_by: str = "train_min_usage_c"  # metric maximised to pick a restart (no labels)


RESTART_STRIDE = 1000


@dataclass(frozen=True)
class Trial:
    """One run of the bench: a method at a data size (None: the base's) with a seed, and which
    restart of it (0 unless the bench has ``restarts`` > 1)."""

    method: str
    size: int | None
    seed: int
    restart: int = 0

    @property
    def name(self) -> str:
        size = "" if self.size is None else f"-n{self.size}"
        restart = "" if self.restart == 0 else f"-r{self.restart}"
        return f"{self.method}{size}-s{self.seed}{restart}"


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree[a][b] = value`` for ``key = "a.b"``, creating sections on the way."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"bench key {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def _flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def trial_config(cfg: BenchConfig, trial: Trial) -> dict[str, Any]:
    """The ``gedi-nesy train`` config mapping of one trial (validated by the caller)."""
    raw = copy.deepcopy(cfg.base)
    for key, value in _flatten(cfg.methods[trial.method]).items():
        set_dotted(raw, key, copy.deepcopy(value))
    for key in cfg.seed_keys:
        set_dotted(raw, key, trial.seed)
    if trial.restart > 0:
        set_dotted(raw, cfg.restart_key, trial.seed + RESTART_STRIDE * trial.restart)
    if trial.size is not None:
        assert cfg.size_key is not None
        set_dotted(raw, cfg.size_key, trial.size)
    raw["name"] = trial.name
    raw["out_dir"] = str(bench_dir(cfg) / "trials")
    return raw


def bench_dir(cfg: BenchConfig) -> Path:
    """The folder of the bench's outputs, ``<out_dir>/<name>``."""
    return Path(cfg.out_dir) / cfg.name


def trials(cfg: BenchConfig) -> list[Trial]:
    """Every trial in run order (method, then size, then seed), after checking the config.

    Raises:
        ConfigError: no methods or seeds, a method that is not a mapping, a size axis given
            halfway, duplicate seeds or sizes, or a trial config `gedi-nesy train` would refuse.
    """
    if not cfg.methods:
        raise ConfigError("the bench config has no methods; add e.g. methods: {dpl: {}}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"bench seeds = {cfg.seeds}; give distinct seeds, e.g. [0, 1, 2]")
    if (cfg.size_key is None) != (not cfg.sizes) or len(set(cfg.sizes)) != len(cfg.sizes):
        raise ConfigError(
            f"bench size_key = {cfg.size_key!r} with sizes = {cfg.sizes}; give both (distinct "
            "sizes, e.g. size_key: task.n_train, sizes: [100, 300]) or neither"
        )
    for method, overrides in cfg.methods.items():
        if not isinstance(overrides, Mapping) or "/" in method or method.startswith("."):
            raise ConfigError(
                f"bench method {method!r} = {overrides!r}: a method is a name without '/' and "
                "a mapping of overrides, e.g. dpl: {gedi.w_inv: 0}"
            )
    if cfg.restarts < 1:
        raise ConfigError(f"bench restarts = {cfg.restarts}; give 1 (no restarts) or more")
    sizes: list[int | None] = list(cfg.sizes) or [None]
    out = [
        Trial(m, n, s, r)
        for m in cfg.methods
        for n in sizes
        for s in cfg.seeds
        for r in range(cfg.restarts)
    ]
    for trial in out:
        try:
            from_dict(NesyRunConfig, trial_config(cfg, trial))
        except ConfigError as exc:
            raise ConfigError(f"bench trial {trial.name}: {exc}") from None
    return out


def trial_dir(cfg: BenchConfig, trial: Trial) -> Path:
    return bench_dir(cfg) / "trials" / trial.name


def is_finished(cfg: BenchConfig, trial: Trial) -> bool:
    """Whether the trial wrote its metrics (the last thing a run does)."""
    return (trial_dir(cfg, trial) / "metrics.json").is_file()


def check_finished_configs(cfg: BenchConfig, all_trials: Sequence[Trial]) -> None:
    """Refuse to skip a finished trial whose saved config differs from what the bench now asks.

    Raises:
        ConfigError: naming the trial and the first setting that differs.
    """
    for trial in all_trials:
        saved_path = trial_dir(cfg, trial) / "config.yaml"
        if not is_finished(cfg, trial) or not saved_path.is_file():
            continue
        saved = with_defaults(NesyRunConfig, yaml.safe_load(saved_path.read_text()))
        now = with_defaults(NesyRunConfig, trial_config(cfg, trial))
        found = config_difference(saved, now)
        if found is not None:
            key, a, b = found
            raise ConfigError(
                f"bench trial {trial.name} finished with {key} = {a!r}, the bench now says "
                f"{b!r}; give the bench another name, or delete {trial_dir(cfg, trial)} to run "
                "it again"
            )


def run_trial(cfg: BenchConfig, trial: Trial) -> bool:
    """Run one trial as ``python -m gedi_nesy train`` in a new process; resume its checkpoint.

    The trial's config is ``trials/<trial>.yaml``; its output (progress off) is appended to
    ``trials/<trial>.log``. While it runs, the bench and the training process hold an exclusive
    lock on ``trials/<trial>.lock`` (released by the system when both end, killed or not), so
    two bench processes over one folder never run a trial at once. A trial that finished after
    the bench planned it is left as it is.

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
    failed: list[str] = []
    elsewhere: list[Trial] = []
    bar = tqdm(total=len(all_trials), initial=len(all_trials) - len(pending), disable=not progress,
               desc=cfg.name, unit="trial")  # fmt: skip
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
    bar.close()
    write_report(cfg, audit)
    return {
        "trials": len(all_trials),
        "skipped": len(all_trials) - len(pending),
        "failed": failed,
        "elsewhere": [t.name for t in elsewhere if not is_finished(cfg, t)],
        "folder": str(out),
    }


def load_results(cfg: BenchConfig) -> list[tuple[Trial, dict[str, Any]]]:
    """(trial, metrics) of every finished trial, in run order."""
    return [
        (t, json.loads((trial_dir(cfg, t) / "metrics.json").read_text()))
        for t in trials(cfg)
        if is_finished(cfg, t)
    ]


def _score(metrics: Mapping[str, Any], key: str) -> float:
    """``metrics[key]`` as a float; -inf when it is missing, not a number, or NaN."""
    value = metrics.get(key)
    if not isinstance(value, int | float) or math.isnan(value):
        return -math.inf
    return float(value)


def select_restarts(
    rows: Sequence[tuple[Trial, dict[str, Any]]], select_by: str
) -> list[tuple[Trial, dict[str, Any]]]:
    """Per (method, size, seed), the finished restart with the highest ``select_by`` value (the
    first restart on a tie; restarts without the metric come last), in run order."""
    best: dict[tuple[str, int | None, int], tuple[Trial, dict[str, Any]]] = {}
    for trial, metrics in rows:
        key = (trial.method, trial.size, trial.seed)
        if key not in best or _score(metrics, select_by) > _score(best[key][1], select_by):
            best[key] = (trial, metrics)
    return list(best.values())


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value


def results_csv(rows: Sequence[tuple[Trial, dict[str, Any]]]) -> str:
    """One line per trial: method, size, seed, then every scalar or list metric (sorted keys)."""
    keys = sorted({k for _, m in rows for k, v in m.items() if not isinstance(v, dict)})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial", "method", "size", "seed", "restart", *keys])
    for trial, metrics in rows:
        size = "" if trial.size is None else trial.size
        cells = [_cell(metrics.get(k, "")) for k in keys]
        writer.writerow([trial.name, trial.method, size, trial.seed, trial.restart, *cells])
    return buf.getvalue()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    digits = 1 if max(abs(v) for v in values) >= 10 else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _maps_text(maps: Sequence[Sequence[int]]) -> str:
    counts: dict[str, int] = {}
    for f in maps:
        text = " ".join(str(v) for v in f)
        counts[text] = counts.get(text, 0) + 1
    return ", ".join(f"`{m}` ×{c}" for m, c in sorted(counts.items(), key=lambda x: -x[1]))


def summary_table(rows: Sequence[tuple[Trial, dict[str, Any]]], columns: Mapping[str, str]) -> str:
    """Markdown: one line per (method, size), mean ± std over seeds of each column, the RS rate
    (seeds with Acc(Y) >= 0.9 and raw Acc(C) < 0.9) and the concept maps the seeds implement."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for trial, metrics in rows:
        groups.setdefault((trial.method, trial.size), []).append(metrics)
    has_size = any(size is not None for _, size in groups)
    head = ["method", *(["size"] if has_size else []), "seeds", *columns.values(), "RS rate",
            "concept maps (ID)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, size), group in groups.items():
        cells = [method, *([str(size)] if has_size else []), str(len(group))]
        for key in columns:
            values = [float(m[key]) for m in group if isinstance(m.get(key), int | float)]
            cells.append(_fmt(values))
        if all("test_task_acc" in m and "acc_c" in m for m in group):
            rate = rs_rate([m["test_task_acc"] for m in group], [m["acc_c"] for m in group])
            cells.append(f"{rate:.2f}")
        else:
            cells.append("-")
        maps = [m["concept_map"] for m in group if "concept_map" in m]
        cells.append(_maps_text(maps) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _confusions(cfg: BenchConfig, rows: Sequence[tuple[Trial, dict[str, Any]]]) -> list[str]:
    """Sum each (method, size)'s ID confusion matrices over seeds and save one PNG each."""
    sums: dict[tuple[str, int | None, str], np.ndarray] = {}
    for trial, _ in rows:
        for path in sorted(trial_dir(cfg, trial).glob("confusion_*.json")):
            net = path.stem.removeprefix("confusion_")
            m = np.asarray(json.loads(path.read_text()), dtype=float)
            key = (trial.method, trial.size, net)
            sums[key] = m if key not in sums else sums[key] + m
    nets = {net for _, _, net in sums}
    written = []
    for (method, size, net), m in sums.items():
        stem = f"confusion_{method}" + ("" if size is None else f"_n{size}")
        stem += "" if len(nets) == 1 else f"_{net}"
        seeds = sum(1 for t, _ in rows if (t.method, t.size) == (method, size))
        title = f"{method}" + ("" if size is None else f", size {size}") + f": {seeds} seeds"
        save_confusion_png(m, bench_dir(cfg) / f"{stem}.png", title=title)
        written.append(f"{stem}.png")
    return written


def _size_plot(cfg: BenchConfig, rows: Sequence[tuple[Trial, dict[str, Any]]]) -> str | None:
    """Raw and matched Acc(C) per method against size, mean ± std over seeds; None: < 2 sizes."""
    sizes = sorted({t.size for t, _ in rows if t.size is not None})
    if len(sizes) < 2:
        return None
    key_of = {"raw Acc(C)": "acc_c", "matched Acc(C)": "acc_c_matched"}  # panel -> metric
    ys: dict[str, dict[str, list[float]]] = {panel: {} for panel in key_of}
    errs: dict[str, dict[str, list[float]]] = {panel: {} for panel in key_of}
    for method in cfg.methods:
        for panel, key in key_of.items():
            means, stds = [], []
            for n in sizes:
                vals = [float(m[key]) for t, m in rows
                        if t.method == method and t.size == n and key in m]  # fmt: skip
                mean, std = mean_std(vals)
                means.append(mean)
                stds.append(std)
            if not all(math.isnan(v) for v in means):
                ys[panel][method], errs[panel][method] = means, stds
    if not all(ys.values()):
        return None
    name = "concept_acc_vs_size.png"
    save_panels_png(sizes, ys, bench_dir(cfg) / name, xlabel=cfg.size_key or "size",
                    ylabel="Acc(C), mean ± std over seeds", title=cfg.name, yerr_panels=errs,
                    logx=sizes[-1] / sizes[0] >= 10)  # fmt: skip
    return name


def write_report(cfg: BenchConfig, audit: Mapping[str, Any] | None = None) -> str:
    """Write results.csv, summary.md, the confusion PNGs and the size plot; return summary.md."""
    out = bench_dir(cfg)
    rows = load_results(cfg)
    atomic_write_text(out / "results.csv", results_csv(rows))
    n_all = len(trials(cfg))
    text = [f"# {cfg.name}\n", f"{len(rows)} of {n_all} trials finished; seeds {cfg.seeds}; "
            f"per-trial configs and logs in `trials/`. Mean ± std over seeds.\n"]  # fmt: skip
    if audit is not None:
        text.append(
            f"Shortcut audit: {audit['n_maps']} deterministic concept maps fit the training "
            f"data, {audit['n_bijections']} of them bijections (`audit.json`).\n"
        )
    kept = rows if cfg.restarts == 1 else select_restarts(rows, cfg.select_by)
    if not rows:
        text.append("No trial has finished yet.\n")
    elif cfg.restarts == 1:
        text.append(summary_table(rows, cfg.columns))
    else:
        text.append(
            f"{cfg.restarts} restarts per seed ({cfg.restart_key} = seed + {RESTART_STRIDE} r); "
            f"per seed the restart with the highest `{cfg.select_by}` is kept:\n"
        )
        text.append(summary_table(kept, cfg.columns))
        text.append("Every restart as its own run (no selection):\n")
        text.append(summary_table(rows, cfg.columns))
    pictures = _confusions(cfg, kept)
    plot = _size_plot(cfg, kept)
    if plot is not None:
        pictures.insert(0, plot)
    if pictures:
        text.append("Figures: " + ", ".join(f"[{p}]({p})" for p in pictures) + ".\n")
    summary = "\n".join(text)
    atomic_write_text(out / "summary.md", summary)
    return summary
