"""The project's user-facing errors: a problem with the input, the config, a file or the data, not a bug.

Every such error derives from :class:`UserError` (and from the builtin it specialises, e.g. ``ValueError``);
the entry points report it in one line starting with ``error:``. No dependencies: importing this module
is free, so an entry point can recognise these errors without importing torch.
"""

from __future__ import annotations

__all__ = [
    "UserError",
    "OptionError",
    "ConfigError",
    "LinkedRunFileError",
    "list_option",
    "check_positive_int",
    "check_bool",
    "check_seed",
    "describe",
    "instantiation_message",
]


class UserError(Exception):
    """Marks an error caused by what the user gave (reported in one line, never with a traceback)."""


class OptionError(UserError, ValueError):
    """An option of the wrong kind (a string where a list is expected, say)."""


class ConfigError(UserError, ValueError):
    """A configuration value that makes no sense (reported in one line)."""


def check_positive_int(value, key: str, minimum: int = 1, maximum: int | None = None) -> int:
    import numbers

    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or int(value) < minimum
        or (maximum is not None and int(value) > maximum)
    ):
        too_large = isinstance(value, numbers.Integral) and maximum is not None and int(value) > maximum
        bound = f"in [{minimum}, {maximum}]" if too_large else f">= {minimum}"
        raise ConfigError(f"{key} must be an integer {bound}, got {value!r}")
    return int(value)


def check_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def check_seed(value, key: str = "seed") -> int:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**32:
        raise ConfigError(f"{key} must be an integer in [0, 2**32), got {value!r}")
    return int(value)


def list_option(value, key: str, example: str) -> list:
    """The items of a list-valued option (a list, tuple or OmegaConf ``ListConfig``). A string, a number or a mapping
    is refused naming the value as given: ``procedure.radii="0.5"`` would otherwise be the characters
    ``['0', '.', '5']``. ``example`` shows the right form (``procedure.radii=[0.5]``). Every list-valued option is
    read through it; each caller checks the items."""
    from collections.abc import Iterable, Mapping

    if isinstance(value, str | bytes | int | float | complex | Mapping) or not isinstance(value, Iterable):
        raise OptionError(f"{key} must be a list, e.g. {example}; got {value!r}")
    return list(value)


class LinkedRunFileError(UserError, OSError):
    """A run file is a symbolic link: ssn_exp never writes through one (it could point anywhere)."""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text).rstrip(".")


def describe(exc: BaseException) -> str:
    """The first line of an exception's message as a sentence a user can act on: a bare ``KeyError('x')`` (whose
    text is only ``'x'``) becomes "no entry 'x' (KeyError)", a ``TypeError``/``AttributeError``/``IndexError`` is
    named (its text alone, "'NoneType' object is not subscriptable", does not say it is an error), and an
    exception without a message is named by its type. Every ``error:`` line built from a caught exception uses it."""
    name = type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1:  # (its text is the repr of its argument)
        arg = exc.args[0]
        return _first_line(arg) if isinstance(arg, str) and " " in arg.strip() else f"no entry {arg!r} ({name})"
    text = _first_line(str(exc))
    if not text:
        return f"{name} (without a message)"
    return f"{name}: {text}" if isinstance(exc, TypeError | AttributeError | IndexError) else text


def instantiation_message(exc: BaseException) -> str:
    """One line from a Hydra ``InstantiationException``: the underlying error (:func:`describe`), without Hydra's
    advice."""
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, ImportError):
        return describe(cause)
    text = _first_line(str(exc))
    return text.split(", set env var HYDRA_FULL_ERROR")[0].split(" (set env var HYDRA_FULL_ERROR")[0]
