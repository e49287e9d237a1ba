"""User-facing error types of o2mag.

The command line prints these without a traceback: they describe a problem with what the user
gave (a path, an image, a mask, settings), not a bug in o2mag.
"""

from __future__ import annotations

__all__ = ["InputError", "MissingInputError", "SettingsConflictError", "SampleExistsError"]


class InputError(ValueError):
    """A user input (file, folder, mask, option) is missing, unreadable or unusable."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named does not exist (also a ``FileNotFoundError``)."""


class SettingsConflictError(InputError):
    """An output folder already holds samples made with other settings (resume refused)."""


class SampleExistsError(InputError, FileExistsError):
    """A complete sample is already on disk and overwriting was not asked for."""
