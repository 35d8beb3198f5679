"""Errors a user can act on.

Every error the library raises for bad input derives from :class:`GediNesyError`; the CLI prints its
message on one line and exits with status 2, without a traceback. Messages say what was given, what
is allowed and how to fix it.
"""

from __future__ import annotations


class GediNesyError(Exception):
    """Base class of all user-facing errors of gedi-nesy."""


class ConfigError(GediNesyError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(GediNesyError):
    """A data set is missing, truncated or corrupt."""


class ProgramError(GediNesyError):
    """A ProbLog program does not parse or does not match the registered networks."""


class TrainingError(GediNesyError):
    """Training cannot go on (non-finite energies or losses, bad checkpoint)."""


class StorageError(GediNesyError):
    """A file or folder cannot be read or written (permissions, a full disk, a file in the way),
    or a saved file is damaged."""
