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

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ssn_exp.atomic import replace_file
from ssn_exp.cli.messages import is_user_error, one_line
from ssn_exp.cli.run_dir import RunLockedError, StartRecord, SweepRecord
from ssn_exp.lightning.quiet import quiet_known_warnings

__all__ = ["run_entry", "guard"]

log = logging.getLogger("ssn_exp")


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
    StartRecord.current = SweepRecord.current = None  # (the records of an earlier call in this process are done)
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
            sweep = SweepRecord.current
            if sweep is not None and sweep.undo():  # failed before any job started (a job's config, say)
                msg = f"the sweep did not start: {msg}"
            else:
                msg = f"a job of the sweep failed: {msg} (the other jobs ran; the same command again resumes the rest)"
        elif StartRecord.current is not None:  # Hydra failed around the task (writing .hydra/, say): undo too
            StartRecord.current.undo()
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def guard(task: Callable, cfg) -> object:
    """Run a Hydra task with one-line user errors.

    A single run prints ``error: ...``, undoes what its start did to the run directory (:meth:`StartRecord.undo`:
    the files and folders this process created are removed, an earlier run's ``.hydra/`` record and log are put
    back as they were) and exits with status 2. In a multirun the job directory keeps ``error.txt`` (the report
    lists the job as failed, with this line) and the error is re-raised, so Hydra records the job as failed and
    runs the others. A job refused because another process runs in its folder writes no ``error.txt`` there.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

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
                    replace_file(out / "error.txt", msg + "\n")
                except OSError:
                    pass
            raise
        record = StartRecord.current
        if record is not None and out is not None and record.out == out.absolute():
            record.undo(others_run_here=isinstance(exc, RunLockedError))
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
