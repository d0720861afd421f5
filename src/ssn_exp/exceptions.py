"""The project's user-facing errors: a problem with the input, the config, a file or the data, not a bug.

Every such error derives from :class:`UserError` (and from the builtin it specialises, e.g. ``ValueError``);
the entry points report it in one line starting with ``error:``. No dependencies: importing this module
is free, so an entry point can recognise these errors without importing torch.
"""

from __future__ import annotations

__all__ = ["UserError", "LinkedRunFileError", "instantiation_message"]


class UserError(Exception):
    """Marks an error caused by what the user gave (reported in one line, never with a traceback)."""


class LinkedRunFileError(UserError, OSError):
    """A run file is a symbolic link: ssn_exp never writes through one (it could point anywhere)."""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text).rstrip(".")


def instantiation_message(exc: BaseException) -> str:
    """One line from a Hydra ``InstantiationException``: the underlying error, without Hydra's advice."""
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, ImportError):
        text = f"{type(cause).__name__}: {_first_line(str(cause))}" if isinstance(cause, TypeError) else str(cause)
        return _first_line(text)
    text = _first_line(str(exc))
    return text.split(", set env var HYDRA_FULL_ERROR")[0].split(" (set env var HYDRA_FULL_ERROR")[0]
