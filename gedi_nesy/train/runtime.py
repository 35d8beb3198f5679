"""Run plumbing: seeds, devices, CPU threads, run folders, atomic files and checkpoints."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gedi_nesy.errors import ConfigError, TrainingError
from gedi_nesy.files import atomic_write, make_folder, remove_stale_temps


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but torch sees no GPU; use device: auto or cpu"
        )
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not allowed; use auto, cpu or cuda")
    return torch.device(name)


def make_run_dir(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """Create the run folder (after every check of the run has passed), clear the temporary
    files a killed earlier attempt left in it, and write the resolved config and the command
    line into it.

    Raises:
        StorageError: the folder cannot be created or written.
    """
    run_dir = make_folder(run_dir, "run folder")
    remove_stale_temps(run_dir)  # one process runs in a run folder (the bench locks trials)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(run_dir / "argv.txt", " ".join(sys.argv) + "\n")
    return run_dir


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, then restore the count found before.

    Training and evaluation set their own count (``optim.threads``) this way, so a caller of the
    Python API gets the speed the CLI gets and keeps its own setting afterwards.

    Args:
        n: threads inside the block (>= 1).
    """
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def prepare_run(
    out_dir: str | Path, name: str, *, device: str, seed: int
) -> tuple[Path, torch.device]:
    """Pick the device and seed everything; nothing is written yet (the caller checks the rest
    of the run, then creates the folder with :func:`make_run_dir`, so a refused run changes
    nothing).

    Args:
        out_dir: folder of the runs.
        name: the run's name (its folder, checked by the config).
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: seeds Python, NumPy and torch.

    Returns:
        (run folder, not created yet; device).
    """
    chosen = pick_device(device)
    set_seed(seed)
    return Path(out_dir) / name, chosen


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``.

    A kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    atomic_write(path, lambda f: torch.save(state, f))


def config_difference(
    saved: dict[str, Any], current: dict[str, Any]
) -> tuple[str, Any, Any] | None:
    """The first setting (dotted key, saved value, current value) where two run configs differ,
    ignoring ``name`` and ``out_dir``; None when they agree."""
    ignored = {"name", "out_dir"}
    for key in sorted(set(saved) | set(current)):
        if key in ignored:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = config_difference(
                {f"{key}.{k}": v for k, v in a.items()}, {f"{key}.{k}": v for k, v in b.items()}
            )
            if found is not None:
                return found
        elif a != b:
            return key, a, b
    return None


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint under a different config (names and folders may differ).

    Raises:
        TrainingError: naming the first setting that differs.
    """
    found = config_difference(saved, current)
    if found is not None:
        key, a, b = found
        raise TrainingError(
            f"checkpoint {path} was made with {key} = {a!r}, the config now says {b!r}; "
            "resume with the checkpoint's config, or start a new run under another name"
        )
