"""User-facing error types of o2mag.

The command line prints these without a traceback: they describe a problem with what the user
gave (a path, an image, a mask, settings), not a bug in o2mag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["InputError", "MissingInputError", "UsageError", "SettingsConflictError", "SampleExistsError",
           "ConcurrentRunError", "ClaimLostError", "DataWarning", "existing_path"]


class InputError(ValueError):
    """A user input (file, folder, mask, option) is missing, unreadable or unusable."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named does not exist (also a ``FileNotFoundError``)."""


class UsageError(InputError):
    """An impossible combination or value of command-line options."""


class SettingsConflictError(InputError):
    """An output folder already holds samples made with other settings (resume refused)."""


class SampleExistsError(InputError, FileExistsError):
    """A complete sample is already on disk and overwriting was not asked for."""


class ConcurrentRunError(SettingsConflictError):
    """Another live run writes the same output folder with other settings (or overwrites it)."""


class ClaimLostError(RuntimeError):
    """This process's claim on a sample was broken (it stalled past the lease); it must not write."""


class DataWarning(RuntimeWarning):
    """A file o2mag reads back was damaged (a cache entry, a manifest line) and was not used: what
    it held is computed again (the command prints it as one ``o2mag: warning:`` line)."""


def existing_path(path: Any, what: str, *, folder: bool = False) -> Path:
    """``path`` as a Path that exists and is a file (or a folder); else an error naming ``what``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise MissingInputError(f"{what} not found: {p}")
    if folder and not p.is_dir():
        raise InputError(f"{what} is not a folder: {p}")
    if not folder and not p.is_file():
        raise InputError(f"{what} is not a file: {p}")
    return p
