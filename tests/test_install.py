"""A normal (non-editable) install works: the wheel carries the configs, the named sweeps and the published
results, and the entry points find them from anywhere."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project's wheel, built from a copy of the source and unpacked as pip would into site-packages."""
    tmp = tmp_path_factory.mktemp("install")
    proj = tmp / "proj"
    proj.mkdir()
    shutil.copytree(ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, proj / name)
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(proj), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("ssn_exp-*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    return site, names, tmp


def _run(installed, *args, timeout=300):
    site, _, tmp = installed
    cwd = tmp / "elsewhere"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_configs_sweeps_and_published_results(installed):
    _, names, _ = installed
    for name in (
        "ssn_exp/conf/config.yaml",
        "ssn_exp/conf/model/digits_cnn.yaml",
        "ssn_exp/conf/sweep/smoke.yaml",
        "ssn_exp/conf/sweep/paper_cifar10.yaml",
        "ssn_exp/conf/hydra/launcher/slurm.yaml",
        "hydra_plugins/ssn_exp_launcher/submit.py",  # the launcher slurm.yaml names (Hydra's plugin namespace)
        "ssn_exp/published/levine2021/index.csv",
        "ssn_exp/published/levine2021/labels.npz",
        "ssn_exp/published/levine2021/cifar10_dssn_standard_none_sigma0.75.npz",
    ):
        assert name in names, name
    assert sum(n.startswith("ssn_exp/published/levine2021/") and n.endswith(".npz") for n in names) == 136
    assert not any(n.startswith("tests/") for n in names)


def test_the_installed_package_is_the_one_imported(installed):
    site, _, _ = installed
    p = _run(installed, "-c", "import ssn_exp.cli.config as c; print(c.CONF_DIR)")
    assert p.returncode == 0 and p.stdout.strip().startswith(str(site)), p.stdout + p.stderr


def test_installed_sweep_and_report_find_their_definitions_and_data(installed):
    site, _, tmp = installed
    p = _run(installed, "-m", "ssn_exp.sweep", "smoke", "--dry-run")
    assert p.returncode == 0 and "12 jobs" in p.stdout and "[11]" in p.stdout, p.stderr
    out = tmp / "report"
    p = _run(installed, "-m", "ssn_exp.report", "--published", "levine2021", "--no-plots", "--out", str(out))
    assert p.returncode == 0, p.stderr
    with open(out / "best_over_sigma.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if (r["dataset"], r["method"], r["training"], r["denoiser"]) == (
            "cifar10", "dssn", "standard", "none")]  # fmt: skip
    assert " ".join(r["certified_accuracy"] for r in rows) == "72.25 63.07 56.21 51.33 46.76 42.66 38.26 33.64"


def test_installed_training_runs_with_the_packaged_configs(installed):
    _, _, tmp = installed
    run = tmp / "run"
    p = _run(installed, "-m", "ssn_exp", "debug=fast", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "metrics.json").is_file() and (run / "certificates.csv").is_file()
