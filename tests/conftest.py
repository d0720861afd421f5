"""Shared fixtures: the read-only ../shared folder (CI has it beside the clone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SSN_EXP_SHARED", ROOT.parent / "shared"))

# Keep the tests fast and quiet on a 2-core CPU, and never online.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "SPEC.md").is_file():
        pytest.fail(f"the shared folder is missing: expected it at {SHARED} (set SSN_EXP_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def reference_dir(shared) -> Path:
    return shared / "reference" / "levine2021"
