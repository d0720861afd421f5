"""Shared fixtures. Everything the tests read lives in the repository: the published arrays ship with the
package (``ssn_exp/published/levine2021``), the other outside references are in ``tests/data``."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
#: Running inside mutmut's copy of the project (make mutation): it forks a worker per mutant from a process that
#: has run torch, and forked children deadlock in a thread pool the parent had started; one thread avoids that.
UNDER_MUTATION = ROOT.name == "mutants"

#: Under pytest-xdist (make test: two test processes on a 2-core CPU) every process, and every entry point a test
#: starts, computes on one thread: two processes with two threads each would oversubscribe the cores.
UNDER_XDIST = "PYTEST_XDIST_WORKER" in os.environ
if UNDER_XDIST:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Keep the tests fast and quiet on a 2-core CPU, and never online.
torch.set_num_threads(1 if UNDER_MUTATION or UNDER_XDIST else min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# wandb keeps staging files, caches and settings under the home folder: the tests' go to a folder removed at exit
# (the entry points' subprocesses inherit these variables)
_WANDB_HOME = tempfile.mkdtemp(prefix="ssn_exp-tests-wandb-")
atexit.register(shutil.rmtree, _WANDB_HOME, ignore_errors=True)
for _var, _sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
    os.environ.setdefault(_var, os.path.join(_WANDB_HOME, _sub))


def _slurm_missing() -> str | None:
    """Why the tests marked ``slurm`` cannot run here (None: a Slurm cluster answers with a usable node)."""
    import subprocess

    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no Slurm here (sbatch/sinfo not found; scripts/slurm_local.sh start installs and starts one)"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "Slurm does not answer (sinfo timed out; scripts/slurm_local.sh start)"
    states = p.stdout.split()
    if p.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        why = (p.stderr.strip().splitlines() or [f"node states {states}"])[-1]
        return f"no Slurm cluster is up ({why}; scripts/slurm_local.sh start)"
    return None


_SLURM_MISSING: list = []


def pytest_runtest_setup(item):
    if item.get_closest_marker("slurm") is not None:
        if not _SLURM_MISSING:
            _SLURM_MISSING.append(_slurm_missing())
        if _SLURM_MISSING[0]:
            pytest.skip(_SLURM_MISSING[0])


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The authors' published certificate arrays, as the package ships them."""
    from ssn_exp.report.records import published_dir

    return published_dir("levine2021")


@pytest.fixture(scope="session")
def verify_arrays():
    """The published fields kept only to verify our code (dssn predicted/radius_l1, uniform/ssn prob_lb/counts_n0)."""
    import numpy as np

    with np.load(DATA / "levine2021_verify.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden_path() -> Path:
    return DATA / "golden" / "dssn_levine2021.npz"


@pytest.fixture(scope="session")
def levine_checkpoint() -> Path:
    return DATA / "levine2021_checkpoint"


# Property-based tests: 150 examples each; under mutation testing (a copy of the project in mutants/) 20, so that
# the thousand-odd mutants finish in reasonable time.
from hypothesis import settings  # noqa: E402

settings.register_profile("ssn_exp", max_examples=150, deadline=None)
settings.register_profile("mutation", max_examples=20, deadline=None)
settings.load_profile("mutation" if UNDER_MUTATION else "ssn_exp")
