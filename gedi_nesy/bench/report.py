"""The report of a bench, written when its trials are done (or by hand, on what has finished).

Next to the trials, in ``<out_dir>/<name>/``:

- ``results.csv``: one row per finished trial, every scalar metric of its ``metrics.json``;
- ``summary.md``: mean ± std over seeds per method (and size), the RS rate, the concept maps the
  seeds implement, and the shortcut audit when the task has one. With ``restarts`` > 1 the
  report keeps, per seed, the restart with the highest ``select_by`` metric (by default
  ``train_min_usage_c``, which reads no label, see ``docs/metrics.md``), and gives below every
  restart as its own run;
- ``confusion_<method>[_<size>].png``: the concept confusion matrix summed over seeds;
- ``curves_<method>[_<size>].png``: every finished trial's logged values against the step, one
  line per seed (and restart);
- ``concept_acc_vs_size.png``: raw and matched Acc(C) against the data size (with >= 2 sizes).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gedi_nesy.bench.plan import (
    RESTART_STRIDE,
    BenchConfig,
    Trial,
    bench_dir,
    read_metrics,
    trial_dir,
    trials,
)
from gedi_nesy.plots import save_confusion_png, save_panels_png
from gedi_nesy.shortcuts.metrics import rs_rate
from gedi_nesy.train.runtime import atomic_write_text
from gedi_nesy.train.steplog import save_log_curves


def load_results(cfg: BenchConfig) -> list[tuple[Trial, dict[str, Any]]]:
    """(trial, metrics) of every finished trial, in run order.

    Args:
        cfg: the bench config.
    """
    found = [(t, read_metrics(cfg, t)) for t in trials(cfg)]
    return [(t, m) for t, m in found if m is not None]


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
    first restart on a tie; restarts without the metric come last), in run order.

    Args:
        rows: (trial, metrics) of the finished trials.
        select_by: the metric key to maximise.
    """
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
    """One line per trial: method, size, seed, then every scalar or list metric (sorted keys).

    Args:
        rows: (trial, metrics) of the finished trials.
    """
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
    """Mean and sample standard deviation (0 for a single value); NaN for none.

    Args:
        values: the values, e.g. one metric over seeds.
    """
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
    (seeds with Acc(Y) >= 0.9 and raw Acc(C) < 0.9) and the concept maps the seeds implement.

    Args:
        rows: (trial, metrics) of the trials to summarise.
        columns: metric key -> column heading.
    """
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


def _curves(cfg: BenchConfig, rows: Sequence[tuple[Trial, dict[str, Any]]]) -> list[str]:
    """Each (method, size)'s training curves, one line per finished trial with a step log."""
    groups: dict[tuple[str, int | None], list[Any]] = {}
    for trial, _ in rows:
        log = trial_dir(cfg, trial) / "log.jsonl"
        if log.is_file():
            groups.setdefault((trial.method, trial.size), []).append(log)
    written = []
    for (method, size), logs in groups.items():
        name = f"curves_{method}" + ("" if size is None else f"_n{size}") + ".png"
        save_log_curves(logs, bench_dir(cfg) / name)
        written.append(name)
    return written


def _size_plot(cfg: BenchConfig, rows: Sequence[tuple[Trial, dict[str, Any]]]) -> str | None:
    """Raw and matched Acc(C) per method against size, mean ± std over seeds; None: < 2 sizes."""
    sizes = sorted({t.size for t, _ in rows if t.size is not None})
    if len(sizes) < 2:
        return None
    key_of = {"raw Acc(C)": "acc_c", "matched Acc(C)": "acc_c_matched"}  # panel -> metric
    ys: dict[str, dict[str, list[float]]] = {panel: {} for panel in key_of}
    errs: dict[str, dict[str, list[float]]] = {panel: {} for panel in key_of}
    for method in dict.fromkeys(t.method for t, _ in rows):  # run order
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
    """Write results.csv, summary.md, the confusion and curve PNGs and the size plot; return
    summary.md.

    Args:
        cfg: the bench config.
        audit: the task's shortcut audit (:func:`gedi_nesy.shortcuts.audit.audit_to_dict`), or None.
    """
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
    pictures = _confusions(cfg, kept) + _curves(cfg, rows)
    plot = _size_plot(cfg, kept)
    if plot is not None:
        pictures.insert(0, plot)
    if pictures:
        text.append("Figures: " + ", ".join(f"[{p}]({p})" for p in pictures) + ".\n")
    summary = "\n".join(text)
    atomic_write_text(out / "summary.md", summary)
    return summary
