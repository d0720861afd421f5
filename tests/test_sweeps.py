"""Named sweeps run as real Hydra --multirun subprocesses; the report reads them; wandb offline."""

from __future__ import annotations

import csv
import math
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import read_metrics, read_wandb_offline, run_cli
from ssn_exp.cli.config import CONF_DIR
from ssn_exp.cli.sweep import available, jobs, load_sweep

EXPECTED = {"smoke": 12, "paper_cifar10": 90, "paper_imagenet": 18, "dssn_seeds": 45, "denoisers": 27}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_sweeps_expand_and_every_job_composes(name):
    assert name in available()
    all_jobs = jobs(load_sweep(name))
    assert len(all_jobs) == EXPECTED[name]
    assert len({tuple(j) for j in all_jobs}) == len(all_jobs)
    # compose enough jobs that every swept value occurs in one (all 90/45/27 would take a while)
    seen, sample = set(), []
    for job in all_jobs:
        if set(job) - seen:
            sample.append(job)
            seen |= set(job)
    assert seen == {item for job in all_jobs for item in job}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for job in sample:
            cfg = compose(config_name="config", overrides=[f"sweep={name}", *job])
            assert cfg.sigma > 0 and cfg.sweep_info.name == name
            OmegaConf.to_container(cfg.method, resolve=True)  # the noise of every swept sigma resolves
    if name == "dssn_seeds":
        assert {c.split("=")[1] for j in all_jobs for c in j if c.startswith("seed=")} == {"0", "1", "2"}


def test_command_line_overrides_replace_swept_lists():
    assert len(jobs(load_sweep("smoke", ["method=dssn"]), ["method=dssn"])) == 3
    assert len(jobs(load_sweep("smoke"), ["sigma=0.1,0.2", "debug=fast"])) == 8
    assert {j[1] for j in jobs(load_sweep("smoke"), ["sigma=0.1,0.2"])} == {"sigma=0.1", "sigma=0.2"}


def test_paper_sweeps_select_the_paper_experiment():
    cfg = load_sweep("paper_cifar10")
    assert cfg.data.name == "cifar10" and cfg.training.epochs == 120 and cfg.model._target_.endswith("WideResNet")
    assert cfg.hydra.sweep.dir == "outputs/sweeps/paper_cifar10"


def test_dry_run_prints_the_command(tmp_path):
    p = run_cli("ssn_exp.sweep", "paper_cifar10", "--dry-run", "--out", str(tmp_path), "--launcher", "slurm")
    assert p.returncode == 0, p.stderr
    assert "90 jobs" in p.stdout and "--multirun" in p.stdout and "hydra/launcher=slurm" in p.stdout
    assert "[89]" in p.stdout


@pytest.mark.slow
def test_smoke_sweep_multirun_with_wandb_and_report(tmp_path):
    out = tmp_path / "smoke"
    p = run_cli(
        "ssn_exp.sweep", "smoke", "debug=fast", "logger=wandb", "sigma=0.25,1.0", "--out", str(out), timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted(d for d in out.iterdir() if (d / "metrics.json").is_file())
    assert len(runs) == 8
    seen = {(read_metrics(r)["method"], read_metrics(r)["sigma"]) for r in runs}
    assert seen == {(m, s) for m in ("uniform", "ssn", "dssn", "laplace") for s in (0.25, 1.0)}
    # one wandb run per job: named by method/sigma/seed, grouped by sweep, summary = metrics.json
    names = set()
    for r in runs:
        wb = read_wandb_offline(r)
        m = read_metrics(r)
        assert wb["group"] == "smoke"
        names.add(wb["name"])
        for key in ("clean_accuracy", "acr", "method", "sigma", "n_examples", "seconds_per_example"):
            assert wb["summary"][key] == m[key], key
        assert {"certificates/_type", "certified_accuracy_curve_table/_type"} <= set(wb["summary"])
        assert {"data", "method", "sigma", "certify"} <= wb["config"]
        assert wb["history"] > 0  # training curves
    assert len(names) == 8 and "dssn-sigma1.0-seed0" in names
    # Laplace noise's rows follow its own radius, -lambda log(2 (1 - p_lower)) with lambda = sigma / sqrt(2), and
    # carry no box-constrained radius
    for r in runs:
        m = read_metrics(r)
        if m["method"] != "laplace":
            continue
        with open(r / "certificates.csv", newline="") as fh:
            cert_rows = list(csv.DictReader(fh))
        assert cert_rows and "radius_box" not in cert_rows[0] and m["lambda"] == m["sigma"] / 2**0.5
        for row in cert_rows:
            p_lower = float(row["p_lower"])
            assert abs(float(row["radius"]) + m["lambda"] * math.log(2.0 * (1.0 - p_lower))) <= 1e-12
    # the report over the sweep: tables and figures
    rep = out / "report"
    with open(rep / "best_over_sigma.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    methods = {"uniform", "uniform (box)", "ssn", "ssn (box)", "dssn", "laplace"}  # laplace: no box rows
    assert {r["method"] for r in rows} == methods and {r["dataset"] for r in rows} == {"digits"}
    best = {(r["method"], r["radius"]): float(r["certified_accuracy"]) for r in rows}
    for method in ("uniform", "ssn"):  # the box rows certify at least as much from the same samples
        assert all(best[(f"{method} (box)", r)] >= best[(method, r)] for m, r in best if m == method)
    assert "| ours | digits | ssn (box) | standard | none |" in (rep / "best_over_sigma.md").read_text()
    assert (rep / "curves_digits_standard_none.png").stat().st_size > 5000
    assert "\\begin{tabular" in (rep / "best_over_sigma.tex").read_text()
    assert (rep / "missing.txt").read_text().strip() == "none"
    # running the sweep again resumes: every job is a quick no-op, results unchanged
    before = {r.name: read_metrics(r) for r in runs}
    p = run_cli("ssn_exp.sweep", "smoke", "debug=fast", "sigma=0.25,1.0", "--out", str(out), "--no-report", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {r.name: read_metrics(r) for r in runs} == before


@pytest.mark.slow
def test_a_failing_job_loses_nothing_and_the_report_says_what_is_missing(tmp_path):
    out = tmp_path / "sw"
    p = run_cli("ssn_exp.sweep", "smoke", "debug=fast", "method=dssn", "sigma=-1,0.5", "--out", str(out))
    assert p.returncode != 0
    done = [d for d in out.iterdir() if (d / "metrics.json").is_file()]
    assert len(done) == 1 and read_metrics(done[0])["sigma"] == 0.5
    missing = (out / "report" / "missing.txt").read_text()
    assert "sigma=-1" in missing


def test_a_sweep_folder_that_is_a_file_is_one_error_line(tmp_path):
    (tmp_path / "sw").write_text("mine")
    p = run_cli("ssn_exp.sweep", "smoke", "--out", str(tmp_path / "sw"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "is a file, not a folder" in lines[0], p.stderr[-2000:]
    assert (tmp_path / "sw").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["sw"]


def test_plan_prints_every_job_and_the_total_and_creates_nothing(tmp_path):
    from helpers import run_cli

    p = run_cli("ssn_exp.sweep", "smoke", "sigma=0.5", "--plan", "--throughput", "10", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    jobs = [line for line in lines if line.startswith("  [")]
    assert len(jobs) == 4 and not list(tmp_path.iterdir())  # nothing written, no data read
    # 15 epochs x 1,437 digits x 3 passes; every 2nd of 360 test images x (64 + 2,000) samples (dssn: L = 27), at 10/s
    train, fixed, exact = 15 * 1437 * 3 / 36000, 180 * 2064 / 36000, 180 * 27 / 36000
    want = f"train 15 ep x 1,437 ex; certify 180 ex x 2,064 passes (fixed); {train:.1f} h training + {fixed:.1f} h"
    assert want in jobs[0] and "fits timeout_min=1440" in jobs[0]
    assert f"certify 180 ex x 27 passes (exact); {train:.1f} h training + {exact:.1f} h" in jobs[2]
    assert lines[-1].startswith(f"total: {4 * train + 3 * fixed + exact:,.1f} GPU-hours (4 jobs")
    p = run_cli("ssn_exp.sweep", "smoke", "sigma=0.5", "--plan", "--throughput", "1", cwd=tmp_path)
    assert "EXCEEDS timeout_min=1440 (certify.num_shards>=5)" in p.stdout  # 180 x 2,064 / 1 s = 103 h
    shards = ["certify.num_shards=5", "certify.shard=0,1,2,3,4"]
    p = run_cli(
        "ssn_exp.sweep", "smoke", "sigma=0.5", "method=ssn", *shards, "--plan", "--throughput", "1", cwd=tmp_path
    )
    assert "fits timeout_min=1440 in 5 shard jobs of 20.6 h" in p.stdout, p.stdout + p.stderr
