"""The fit loop's checkpoint: what it holds, reading it safely, checking it before use.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain values only, so a
file planted in a run folder cannot run code on ``--resume`` (the bench adds ``--resume`` by
itself). Its structure and its config are checked before anything is restored; a file that
unpickles but lacks a key is a one-line error naming the key.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gedi_nesy.errors import TrainingError
from gedi_nesy.schema import to_dict, with_defaults
from gedi_nesy.train.runtime import check_resume_config

# 3: plain values only (weights_only); 2: the loop's first checkpoint, with NumPy arrays
CHECKPOINT_FORMAT = 3
_FIX = "delete it (or run without --resume under another name) to start the run over"
# key -> (type, the keys it must hold)
STRUCTURE: dict[str, tuple[type, tuple[str, ...]]] = {
    "format": (int, ()),
    "trainer": (dict, ("step",)),
    "scheduler": (dict, ()),
    "fit": (dict, ("best_val", "bad_evals", "best_nets", "stopped_early")),
    "hooks": (list, ()),
    "rng": (dict, ("python", "numpy", "torch")),
    "config": (dict, ()),
}


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (on the CPU) without running any code it might hold.

    Raises:
        TrainingError: no file, a damaged file, or one holding anything but tensors and plain
            values (an earlier format, another program's file, or a crafted one).
    """
    try:
        found = Path(path).is_file()
    except OSError as exc:
        raise TrainingError(f"checkpoint {path} cannot be read ({exc.strerror})") from None
    if not found:
        raise TrainingError(f"no checkpoint at {path}; run without --resume to start a new run")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # a damaged file, not a refused class
            raise TrainingError(f"checkpoint {path} cannot be read (damaged); {_FIX}") from None
        raise TrainingError(
            f"checkpoint {path} holds objects other than tensors and plain values (written by "
            f"an earlier gedi-nesy, or not by gedi-nesy); it was not loaded: {_FIX}"
        ) from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise TrainingError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}); {_FIX}"
        ) from None
    if not isinstance(saved, dict):
        raise TrainingError(f"checkpoint {path} holds a {type(saved).__name__}, not a dict; {_FIX}")
    return saved


def check_structure(saved: dict[str, Any], path: Path, n_hooks: int) -> None:
    """Check that a loaded checkpoint has the loop's format and every key it needs.

    Args:
        saved: what :func:`load_checkpoint` returned.
        path: the file, for messages.
        n_hooks: the step hooks of the run resuming it.

    Raises:
        TrainingError: another format, a missing key or a value of the wrong type (named).
    """
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(
            f"checkpoint {path} was written by an earlier version of gedi-nesy (format "
            f"{saved.get('format')!r}, this one reads {CHECKPOINT_FORMAT}); run without --resume "
            "(or delete the run folder) to start the run over"
        )
    for key, (kind, inner) in STRUCTURE.items():
        if not isinstance(saved.get(key), kind):
            got = "nothing" if key not in saved else type(saved[key]).__name__
            raise TrainingError(
                f"checkpoint {path} is damaged: '{key}' should be a {kind.__name__}, it holds "
                f"{got}; {_FIX}"
            )
        missing = [k for k in inner if k not in saved[key]]
        if missing:
            raise TrainingError(
                f"checkpoint {path} is damaged: it lacks '{key}.{missing[0]}'; {_FIX}"
            )
    if len(saved["hooks"]) != n_hooks:
        raise TrainingError(
            f"checkpoint {path} holds {len(saved['hooks'])} step hooks, the run has {n_hooks}; "
            f"{_FIX}"
        )


def read_checkpoint(path: Path, cfg: Any, n_hooks: int = 0) -> dict[str, Any]:
    """Load a checkpoint and check its structure and that it was made under ``cfg``.

    Args:
        path: the checkpoint file.
        cfg: the run config now (its type reads the saved one: new settings take defaults).
        n_hooks: the step hooks of the run.

    Raises:
        TrainingError: see :func:`load_checkpoint`, :func:`check_structure`, or another config.
    """
    saved = load_checkpoint(path)
    check_structure(saved, path, n_hooks)
    check_resume_config(with_defaults(type(cfg), saved["config"]), to_dict(cfg), path)
    return saved


def restore_failed(path: Path, exc: Exception) -> TrainingError:
    """The error for a checkpoint whose parts do not fit the run's trainer (a missing key deep
    inside, a tensor of another shape)."""
    what = (
        f"it lacks the key {exc.args[0]!r}"
        if isinstance(exc, KeyError)
        else (str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    )
    return TrainingError(f"checkpoint {path} does not fit this run ({what}); {_FIX}")
