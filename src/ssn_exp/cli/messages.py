"""What is the user's mistake, and how it reads in one line (layer 3): the one classification of an exception
behind every ``error: ...`` line of the entry points (:mod:`ssn_exp.cli.errors`, :mod:`ssn_exp.cli.run_dir`,
:mod:`ssn_exp.cli.sweep`)."""

from __future__ import annotations

import errno
import sys

from ssn_exp.exceptions import UserError, describe

__all__ = ["user_error_types", "is_user_error", "one_line"]

_OS_USER_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,  # a run directory (a tag, an override value) too long for the file system
}


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's mistake (cheap: nothing heavy is imported)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (UserError, FileNotFoundError, HydraException, OmegaConfBaseException)


def _rank_failure(exc: BaseException) -> str | None:
    """A one-line description of a DDP rank that failed or died (torch.multiprocessing), else None."""
    if "torch.multiprocessing" not in sys.modules:  # no DDP ran in this process
        return None
    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

    if isinstance(exc, ProcessExitedException):
        how = f"signal {exc.signal_name}" if exc.signal_name else f"exit status {exc.exit_code}"
        return f"DDP rank {exc.error_index} died ({how}); the other ranks were stopped"
    if isinstance(exc, ProcessRaisedException):
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return f"DDP rank {exc.error_index} failed: {lines[-1] if lines else 'unknown error'}"
    return None


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, user_error_types()) or _rank_failure(exc) is not None:
        return True
    lightning = sys.modules.get("lightning_fabric.utilities.exceptions")  # Lightning's "configured wrong": a trainer
    if lightning is not None and isinstance(exc, lightning.MisconfigurationException):  # or callback of the user's
        return True
    return isinstance(exc, OSError) and exc.errno in _OS_USER_ERRNOS


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (Hydra's option lists folded into a parenthesis; a bare ``KeyError``, a
    message-less exception and a missing config value made a sentence)."""
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

    rank = _rank_failure(exc)
    if rank is not None:
        return rank
    if isinstance(exc, MissingMandatoryValue | InterpolationToMissingValueError):  # (???, or a ${...} of one)
        text = str(exc)
        missing = text.split("Missing mandatory value:")[-1].split() if "Missing mandatory value:" in text else []
        if missing:
            return f"{missing[0]} is not set: give {missing[0]}=... on the command line"
        first = text.strip().splitlines()[0] if text.strip() else "a missing value"  # ??? in a list: no key
        return f"a config value is not set ({first}): ??? must be given on the command line"
    if isinstance(exc, KeyError) and not isinstance(exc, OmegaConfBaseException):
        return describe(exc)
    if isinstance(exc, OSError) and exc.errno in _OS_USER_ERRNOS and exc.filename:
        return f"cannot write or read {exc.filename}: {exc.strerror}"
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    for i, ln in enumerate(lines):
        if ln.startswith("Available options"):
            head = " ".join(lines[:i]).rstrip(".")
            opts = []
            for item in lines[i + 1 :]:
                if item.endswith(":") or item.startswith("Config search path"):
                    break
                opts.append(item)
            return f"{head} ({ln.rstrip(':').lower()}: {', '.join(opts)})"
    msg = " ".join(lines) or describe(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    return msg
