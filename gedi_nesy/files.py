"""Files written whole or not at all: a temporary file in the same folder, fsync, rename.

A process killed while writing leaves the previous file and, at worst, a temporary file named
``.<name>.<random>.tmp``; :func:`remove_stale_temps` clears those on the next run. Files get the
permissions ``open()`` would give them (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from gedi_nesy.errors import StorageError

TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what mkstemp makes for atomic_write


@functools.cache
def _umask() -> int:
    """The process umask, read from /proc (the set-and-restore fallback runs once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Write a file through ``write(f)`` on a temporary file next to it, fsync, then rename it
    over ``path``: a kill at any moment leaves the old file or the new one, never a torn one.

    Args:
        path: the file to (re)write; its folder must exist.
        write: writes the content to a binary file object.

    Returns:
        ``path``.

    Raises:
        StorageError: the folder cannot be written (permissions, a full disk, a file where the
            folder should be).
    """
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(_message(target, exc)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StorageError(_message(target, exc)) from None
        raise
    return target


def _message(target: Path, exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    return (
        f"cannot write {target} ({reason}); make {target.parent} a writable folder with free "
        "space, or choose another out_dir"
    )


def remove_stale_temps(folder: str | os.PathLike[str], older_than_s: float = 0.0) -> list[str]:
    """Delete the temporary files :func:`atomic_write` leaves when killed mid-write.

    Args:
        folder: the folder to clean (a missing folder is fine).
        older_than_s: only files last changed at least this long ago (a folder other processes
            may be writing to at the same time needs a margin; a locked run folder does not).

    Returns:
        The names removed, sorted.
    """
    removed = []
    now = time.time()
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            if TEMP_NAME.match(entry.name) and now - entry.stat().st_mtime >= older_than_s:
                entry.unlink()
                removed.append(entry.name)
        except OSError:
            continue  # gone already, or not ours to remove
    return sorted(removed)


def make_folder(folder: str | os.PathLike[str], what: str) -> Path:
    """Create ``folder`` (and its parents) unless it exists.

    Args:
        folder: the folder.
        what: what it is, for the message (e.g. ``run folder``).

    Raises:
        StorageError: it cannot be created (no permission, a file in the way).
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StorageError(
            f"cannot create the {what} {path} ({reason}); remove the file in the way, fix the "
            "permissions, or choose another out_dir"
        ) from None
    return path
