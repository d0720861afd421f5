"""SIGTERM (what Slurm and submitit send before a time limit or preemption): a non-zero exit with one line, and
the same command resumes to exactly the result of a run that never stopped (issue 16 §3). The end-to-end runs share
their uninterrupted reference runs with the kill -9 tests in ``test_scale.py`` (training and certification), which
use the helpers here; the finished training run there also checks that a refused restart leaves it byte-identical."""

from __future__ import annotations

import os
import signal
import sys
import time

from helpers import start_cli


def _start(module, *overrides):
    return start_cli(module, *overrides)


def _terminate_when(proc, ready, timeout=180) -> str:
    """SIGTERM to the process once ``ready()``; its stderr."""
    t0 = time.monotonic()
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be terminated: " + proc.stderr.read()[-3000:]
            assert time.monotonic() - t0 < timeout
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        return proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _one_sigterm_line(proc, err: str, during: str) -> None:
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1] == f"error: terminated by SIGTERM during {during}; rerun the same command to resume", err[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1 and "Traceback" not in err, err[-3000:]


def test_the_sigterm_line_names_certification_when_certification_is_interrupted():
    """Certification after training runs inside ``python -m ssn_exp``: the line must say what was stopped."""
    from ssn_exp.cli.errors import _phase

    def certify_module():  # a frame of the certification code on the stack
        return _phase(sys._getframe())

    def fit():
        return _phase(sys._getframe())

    assert certify_module() == "certification"
    assert fit() == "training"
