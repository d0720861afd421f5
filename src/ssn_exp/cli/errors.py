"""One-line errors for the entry points (layer 3).

:func:`run_entry` runs a ``@hydra.main`` function so that Hydra's own errors (an unknown config option,
a bad override), the project's user errors (bad values, missing data, bad checkpoints or result files,
inputs off the grid, non-finite logits) and a dying DDP rank end in one line ``error: ...`` and exit
status 2, Ctrl-C in one line saying how to resume (exit 130), and SIGTERM (what Slurm and submitit send
before a time limit or preemption) in one line too (exit 143). Genuine bugs keep their traceback;
``HYDRA_FULL_ERROR=1`` (or ``SSN_EXP_TRACEBACK=1``) shows the traceback of everything.

The run directory itself (what a failed start undoes, the lock) is :mod:`ssn_exp.cli.run_dir`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ssn_exp.exceptions import UserError, describe
from ssn_exp.lightning.quiet import quiet_known_warnings

__all__ = ["user_error_types", "is_user_error", "one_line", "run_entry", "guard"]

log = logging.getLogger("ssn_exp")

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
        missing = str(exc).split("Missing mandatory value:")[-1].split()
        if missing:
            return f"{missing[0]} is not set: give {missing[0]}=... on the command line"
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


def _multirun() -> bool:
    return any(a in ("-m", "--multirun") for a in sys.argv[1:])


class _Interrupted:
    flag = False
    sigterm: str | None = None  # "training" / "certification": what SIGTERM stopped
    during = "training"  # what this entry point does, when the stack does not say


class Terminated(KeyboardInterrupt):
    """SIGTERM: raised like Ctrl-C's KeyboardInterrupt, so Lightning stops as gracefully (and kills its DDP
    processes); the finished epochs (``last.ckpt``) and certificates are kept, and the same command resumes."""


def _on_sigint(signum, frame):
    _Interrupted.flag = True
    raise KeyboardInterrupt


def _phase(frame) -> str:
    """What SIGTERM interrupted: certification if a frame of the stack is certifying, else the entry point's job."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.endswith(os.path.join("lightning", "certification.py")) or code.co_name in (
            "certify_module",
            "run_certify",
        ):
            return "certification"
        frame = frame.f_back
    return _Interrupted.during


def _on_sigterm(signum, frame):
    if _Interrupted.sigterm is not None:  # a second SIGTERM while stopping: let the first one finish
        return
    _Interrupted.sigterm = _phase(frame)
    if "multiprocessing" in sys.modules:  # ddp_spawn ranks are this process's non-daemon children: stop them
        import multiprocessing

        for proc in multiprocessing.active_children():
            if not proc.daemon and proc.pid is not None:  # (DataLoader workers are daemons and end with us)
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    raise Terminated


def _sigterm_line() -> str:
    return f"error: terminated by SIGTERM during {_Interrupted.sigterm}; rerun the same command to resume"


def run_entry(main: Callable[[], object], during: str = "training") -> None:
    """Run a ``@hydra.main`` function with one-line errors (see the module docstring).

    ``during`` names what the entry point does, for the SIGTERM line (certification is recognised anyway).
    """
    from ssn_exp.cli.run_dir import _StartRecord, _SweepRecord

    full = os.environ.get("SSN_EXP_TRACEBACK") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"
    if full:
        os.environ["SSN_EXP_TRACEBACK"] = "1"  # the user asked for tracebacks: jobs and DDP ranks show them too
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; we print one line below
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    _Interrupted.during = during
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):  # Lightning then chains to ours
        signal.signal(signal.SIGTERM, _on_sigterm)
    quiet_known_warnings()
    _StartRecord.current = _SweepRecord.current = None  # (the records of an earlier call in this process are done)
    resume = "run the same command again to resume: finished epochs, certificates and sweep jobs are kept"
    quiet = os.environ.get("SSN_EXP_IN_SWEEP") == "1"  # python -m ssn_exp.sweep says it once for the sweep
    try:
        main()
    except BaseException as exc:
        if _Interrupted.sigterm is not None and not (full and isinstance(exc, Exception)):
            # whatever the stopping raised on the way out (Lightning's exit(1), a killed rank): one line
            if not quiet:  # (python -m ssn_exp.sweep says it once for the sweep)
                print(_sigterm_line(), file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and _Interrupted.flag):
            # (Lightning turns Ctrl-C during fit into exit(1))
            if not quiet:
                print(f"error: interrupted; {resume}", file=sys.stderr)
            sys.exit(130)
        if not isinstance(exc, Exception) or full or not is_user_error(exc):
            raise
        msg = one_line(exc)
        if _multirun():
            sweep = _SweepRecord.current
            if sweep is not None and sweep.undo():  # failed before any job started (a job's config, say)
                msg = f"the sweep did not start: {msg}"
            else:
                msg = f"a job of the sweep failed: {msg} (the other jobs ran; the same command again resumes the rest)"
        elif _StartRecord.current is not None:  # Hydra failed around the task (writing .hydra/, say): undo too
            _StartRecord.current.undo()
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def guard(task: Callable, cfg) -> object:
    """Run a Hydra task with one-line user errors.

    A single run prints ``error: ...``, undoes what its start did to the run directory (:meth:`_StartRecord.undo`:
    the files and folders this process created are removed, an earlier run's ``.hydra/`` record and log are put
    back as they were) and exits with status 2. In a multirun the job directory keeps ``error.txt`` (the report
    lists the job as failed, with this line) and the error is re-raised, so Hydra records the job as failed and
    runs the others. A job refused because another process runs in its folder writes no ``error.txt`` there.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ssn_exp.cli.run_dir import RunLockedError, _StartRecord, _write_new_file

    try:
        return task(cfg)
    except Exception as exc:
        if os.environ.get("SSN_EXP_TRACEBACK") == "1" or not is_user_error(exc) or _Interrupted.sigterm is not None:
            raise
        msg = one_line(exc)
        try:
            hc = HydraConfig.get()
            out, multirun = Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN
        except ValueError:
            out, multirun = None, False
        if multirun:
            log.error("error: %s", msg)
            if not isinstance(exc, RunLockedError):  # (the folder is another process's: its job is running there)
                try:
                    _write_new_file(out / "error.txt", msg + "\n")
                except OSError:
                    pass
            raise
        record = _StartRecord.current
        if record is not None and out is not None and record.out == out.absolute():
            record.undo(others_run_here=isinstance(exc, RunLockedError))
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
