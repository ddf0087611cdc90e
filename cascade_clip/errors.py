"""The project's error types.

`CascadeClipError` is an expected failure a user can act on: bad input (a file, a config
key, a value), a failed download, a run that diverged. The CLI reports it in one line
naming the file or key. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class CascadeClipError(Exception):
    """An expected failure with a one-line message naming the file or key."""


class InputError(CascadeClipError, ValueError):
    """A value, file content or config key that cannot be used."""


class MissingInputError(CascadeClipError, FileNotFoundError):
    """A file or folder the command needs is not there."""
