"""The JSONL step log of a run (``log.jsonl``: one JSON object per logged step, with its
``step``), reading it back, and drawing it as training curves (``curves.png``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gedi_nesy.errors import ConfigError, StorageError, TrainingError
from gedi_nesy.plots import save_curves_png
from gedi_nesy.train.runtime import atomic_write_text

NOT_CURVES = ("step", "lr")  # logged keys that are not drawn by default, with those ending "_per_s"


class StepLog:
    """Append-only JSONL log of per-step values; on resume, lines past the resumed step are dropped.

    The kept lines are rewritten atomically. A torn last line (a kill during its append, so
    past the checkpoint) is dropped; a damaged line before it is an error.

    Args:
        path: the ``.jsonl`` file.
        resume_step: keep only lines with ``step <= resume_step``, the steps the checkpoint holds
            (None: start a new file).

    Raises:
        TrainingError: a line other than the last is not a JSON object with a ``step``.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        kept = []
        if resume_step is not None and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line, row in _parsed(lines, self.path) if row["step"] <= resume_step]
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def save_curves(self, path: str | os.PathLike[str]) -> Path | None:
        """Draws the logged values (:func:`gedi_nesy.plots.save_curves_png`) to ``path``; None,
        and nothing written, while no step is logged."""
        rows = read_log(self.path)
        return save_curves_png(log_curves({self.path.parent.name: rows}), path) if rows else None


def _parsed(lines: Sequence[str], file: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of each log line that is a JSON object with an int ``step``; a torn last line
    is left out.

    Raises:
        TrainingError: a line other than the last is not a JSON object with a ``step``.
    """
    parsed = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if i < len(lines) - 1:
                raise TrainingError(
                    f"{file} line {i + 1} is damaged (not a JSON row with a step); "
                    "delete the line, or the run folder to start over"
                )
            continue
        parsed.append((line, row))
    return parsed


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a step log, in order. A torn last line (a run killed during its append, or
    one still writing) is left out.

    Args:
        path: a ``log.jsonl`` file, or the run folder holding one.

    Raises:
        StorageError: no such file.
        TrainingError: a line other than the last is not a JSON object with a ``step``.
    """
    file = Path(path) / "log.jsonl" if Path(path).is_dir() else Path(path)
    try:
        lines = [line for line in file.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise StorageError(
            f"cannot read the step log {file} ({exc.strerror or exc}); give a run folder or its "
            "log.jsonl"
        ) from None
    return [row for _, row in _parsed(lines, file)]


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def log_curves(
    logs: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str] | None = None
) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """The curves of step logs: per logged value, per run, the steps it was logged at and its
    values there.

    Args:
        logs: run label -> the rows of its step log (:func:`read_log`).
        keys: the values to draw; None: every numeric value logged, in first-logged order,
            except ``step``, ``lr`` and speeds (``*_per_s``).

    Returns:
        value name -> (run label -> (steps, values)); a run that never logged a value is left out
        of its panel.

    Raises:
        ConfigError: a requested value that no run logged, or nothing to draw.
    """
    logged = list(dict.fromkeys(
        k for rows in logs.values() for row in rows for k, v in row.items() if _numeric(v)
    ))  # fmt: skip
    default = [k for k in logged if k not in NOT_CURVES and not k.endswith("_per_s")]
    wanted = default if keys is None else list(keys)
    unknown = [k for k in wanted if k not in logged]
    if unknown or not wanted:
        raise ConfigError(
            f"no run logged {unknown or 'any value to draw'}; the logs hold "
            f"{logged or 'no values'}: give some of those, or logs of runs that took steps"
        )
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for key in wanted:
        for run, rows in logs.items():
            points = [(row["step"], float(row[key])) for row in rows if _numeric(row.get(key))]
            if points:
                steps, values = zip(*points)
                curves.setdefault(key, {})[run] = (list(steps), list(values))
    return curves


def run_label(log: str | os.PathLike[str]) -> Path:
    """The run folder of a step log given as a run folder or its ``log.jsonl``."""
    path = Path(log)
    return path.parent if path.name == "log.jsonl" else path


def save_log_curves(
    logs: Sequence[str | os.PathLike[str]],
    path: str | os.PathLike[str],
    keys: Sequence[str] | None = None,
    *,
    log_y: bool = False,
) -> Path:
    """Draws runs' step logs as training curves (:func:`gedi_nesy.plots.save_curves_png`): one
    panel per value, one line per run, named by its run folder (by the folder's path where two
    folders share a name).

    Args:
        logs: each run's ``log.jsonl`` or run folder.
        path: the PNG to write.
        keys: the values to draw (:func:`log_curves`).
        log_y: draw the y axes on a log scale (for losses falling by orders of magnitude).

    Returns:
        The path written.

    Raises:
        ConfigError: the same run given twice, or what :func:`log_curves` raises.
    """
    folders = [run_label(log) for log in logs]
    if len(set(folders)) < len(folders):
        raise ConfigError(f"runs {[str(f) for f in folders]} name one run twice; give each once")
    names = [f.name for f in folders]
    labels = names if len(set(names)) == len(names) else [str(f) for f in folders]
    rows = {label: read_log(log) for label, log in zip(labels, logs)}
    return save_curves_png(log_curves(rows, keys), path, log_y=log_y)
