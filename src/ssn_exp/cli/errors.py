"""One-line errors for the entry points (layer 3).

:func:`run_entry` runs a ``@hydra.main`` function so that Hydra's own errors (an unknown config option,
a bad override), the project's user errors (bad values, missing data, bad checkpoints or result files,
inputs off the grid, non-finite logits) and a dying DDP rank end in one line ``error: ...`` and exit
status 2, and Ctrl-C in one line saying how to resume (exit 130). Genuine bugs keep their traceback;
``HYDRA_FULL_ERROR=1`` (or ``SSN_EXP_TRACEBACK=1``) shows the traceback of everything.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ssn_exp.exceptions import UserError

__all__ = ["user_error_types", "one_line", "run_entry", "guard", "RunLock", "RunLockedError"]

log = logging.getLogger("ssn_exp")

#: What Hydra leaves in a run directory before the task starts (and the lock): a directory holding only
#: these after a failed start is removed, so that failed runs do not look like runs.
_HYDRA_ONLY = {".hydra", "ssn_exp.log", ".ssn_exp.lock"}
_OS_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


class RunLockedError(UserError, RuntimeError):
    """Another process is running in the same run directory."""


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
    return isinstance(exc, OSError) and exc.errno in _OS_USER_ERRNOS


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (Hydra's option lists folded into a parenthesis)."""
    rank = _rank_failure(exc)
    if rank is not None:
        return rank
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
    msg = " ".join(lines) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    return msg


def _multirun() -> bool:
    return any(a in ("-m", "--multirun") for a in sys.argv[1:])


class _Interrupted:
    flag = False


def _on_sigint(signum, frame):
    _Interrupted.flag = True
    raise KeyboardInterrupt


def _quiet_known_warnings() -> None:
    """Silence library warnings that say nothing to a user of ssn_exp (and bury its one-line errors)."""
    import warnings

    for message in (
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning vs torch internals
        r".*smaller than the logging interval.*",  # short debug runs; ssn_exp logs one row per epoch itself
        r".*does not have many workers which may be a bottleneck.*",  # digits are in memory
        r".*`self\.log\(\)` but the `self\.trainer` reference is not registered.*",
        # on every resume: ssn_exp itself decides whether a run directory may be continued (resume=, tag=)
        r"Checkpoint directory .* exists and is not empty",
    ):
        warnings.filterwarnings("ignore", message=message)
    # spawned DDP ranks start a fresh interpreter: the same filters through the environment (a message prefix there)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore:Checkpoint directory")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_drop_tips)


def _drop_tips(record: logging.LogRecord) -> bool:
    """Drop the advertisement Lightning logs for every Trainer ("Tip: ... litlogger ..."): not news to a user."""
    return "litlogger" not in str(record.msg)


def run_entry(main: Callable[[], object]) -> None:
    """Run a ``@hydra.main`` function with one-line errors (see the module docstring)."""
    full = os.environ.get("SSN_EXP_TRACEBACK") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"
    if full:
        os.environ["SSN_EXP_TRACEBACK"] = "1"  # the user asked for tracebacks: jobs and DDP ranks show them too
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; we print one line below
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    _quiet_known_warnings()
    resume = "run the same command again to resume: finished epochs, certificates and sweep jobs are kept"
    quiet = os.environ.get("SSN_EXP_IN_SWEEP") == "1"  # python -m ssn_exp.sweep says it once for the sweep
    try:
        main()
    except KeyboardInterrupt:
        if not quiet:
            print(f"error: interrupted; {resume}", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        if _Interrupted.flag:  # Lightning turns Ctrl-C during fit into exit(1)
            if not quiet:
                print(f"error: interrupted; {resume}", file=sys.stderr)
            sys.exit(130)
        raise
    except Exception as exc:
        if full or not is_user_error(exc):
            raise
        msg = one_line(exc)
        if _multirun():
            msg = f"a job of the sweep failed: {msg} (the other jobs ran; the same command again resumes the rest)"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def guard(task: Callable, cfg) -> object:
    """Run a Hydra task with one-line user errors.

    A single run prints ``error: ...``, removes the directory Hydra made for it if nothing else is in it
    (failed runs do not look like runs) and exits with status 2. In a multirun the job directory keeps
    ``error.txt`` (the report lists the job as failed, with this line) and the error is re-raised, so Hydra
    records the job as failed and runs the others.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return task(cfg)
    except Exception as exc:
        if os.environ.get("SSN_EXP_TRACEBACK") == "1" or not is_user_error(exc):
            raise
        msg = one_line(exc)
        try:
            hc = HydraConfig.get()
            out, multirun = Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN
        except ValueError:
            out, multirun = None, False
        if multirun:
            log.error("error: %s", msg)
            try:
                (out / "error.txt").write_text(msg + "\n")
            except OSError:
                pass
            raise
        if out is not None and not isinstance(exc, RunLockedError):  # a locked directory is another process's
            _remove_if_empty_run(out)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def _remove_if_empty_run(out: Path) -> None:
    """Remove what Hydra wrote for a run that failed before it started, then the directory if that left it empty.

    Nothing else is ever removed: not a directory holding anything more, not the working directory, and not
    a directory whose lock another process holds (a second process failing a check must not touch the first's).
    """
    if not out.is_dir() or out.resolve() == Path.cwd().resolve():
        return
    names = {p.name for p in out.iterdir()}
    if not names <= _HYDRA_ONLY:
        return
    try:
        with RunLock(out):
            pass
    except (RunLockedError, OSError):
        return
    shutil.rmtree(out / ".hydra", ignore_errors=True)
    for name in _HYDRA_ONLY - {".hydra"}:
        (out / name).unlink(missing_ok=True)
    parent = out
    for _ in range(4):  # the run directory and the empty <data>/<method>-... folders Hydra made above it
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


class RunLock:
    """An exclusive lock on a run directory (``.ssn_exp.lock``, flock): a second process is refused at once."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".ssn_exp.lock"
        self._fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            fh.close()
            raise RunLockedError(
                f"another ssn_exp process (pid {pid}) is running in {self.path.parent}; wait for it to finish, "
                "or give this run its own directory (tag=NAME)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc):
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
        return False
