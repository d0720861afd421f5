"""One model's certification split over jobs (``certify.num_shards``/``certify.shard``) through the real entry
points: shard jobs of a trained run's certification, merged by the last one, equal one job's certification."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import certificate_columns, one_error_line, read_csv, run_cli, same_metrics

FAST = ["debug=fast", "method=ssn", "procedure.n=300", "certify.max_examples=9", "logger=none", "seed=3"]


@pytest.mark.slow
def test_shard_jobs_of_a_trained_run_merge_to_the_single_job_result_and_a_foreign_split_is_refused(tmp_path):
    sweep = [f"hydra.sweep.dir={tmp_path / 'sweep'}", *FAST]
    p = run_cli("ssn_exp", "--multirun", *sweep, "certify.num_shards=3", "certify.shard=0")
    assert p.returncode != 0 and "holds 0 of 1 epochs: train it first" in p.stderr  # nothing trained yet
    p = run_cli("ssn_exp", "--multirun", *sweep, "certify.enabled=false")  # the training job
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_cli("ssn_exp", "--multirun", *sweep, "certify.num_shards=3", "certify.shard=0,1,2")  # the shard jobs
    assert p.returncode == 0, p.stderr[-2000:]
    assert "shard 0 of 3 done; waiting for shards 1, 2" in p.stdout
    (run,) = [d.parent for d in (tmp_path / "sweep").rglob("metrics.json")]  # the training run's one directory
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted(x.name for x in run.glob("certificates*.csv")) == ["certificates.csv"]
    single = tmp_path / "single"
    p = run_cli("ssn_exp", *FAST, f"hydra.run.dir={single}")  # trains the same model and certifies it in one job
    assert p.returncode == 0, p.stderr[-2000:]
    rows = certificate_columns(read_csv(run / "certificates.csv"))
    assert len(rows) == 9 and rows == certificate_columns(read_csv(single / "certificates.csv"))
    same_metrics(json.loads((run / "metrics.json").read_text()), json.loads((single / "metrics.json").read_text()))

    # python -m ssn_exp.certify: a shard job needs its shard; a shard of another split is refused at the merge
    out, ckpt = tmp_path / "cert", tmp_path / "model.ckpt"
    shutil.copyfile(run / "checkpoints" / "last.ckpt", ckpt)
    args = [f"ckpt={ckpt}", f"hydra.run.dir={out}", *FAST[2:4], "logger=none"]
    p = run_cli("ssn_exp.certify", *args, "certify.num_shards=3", "certify.shard=1")
    assert p.returncode == 0 and "shard 1 of 3 done; waiting for shards 0, 2" in p.stdout, p.stderr[-2000:]
    p = run_cli("ssn_exp.certify", *args, "certify.num_shards=4", "certify.shard=0")  # another split, same folder
    assert "certificates.shard1of3.csv is not a shard of this certification" in one_error_line(p)
    assert not (out / "certificates.csv").exists()


@pytest.mark.parametrize(
    "given, error",
    [
        (["certify.num_shards=2"], r"certify.num_shards=2 needs certify.shard=i \(0..1\)"),
        (["certify.shard=1"], r"certify.shard=1 needs certify.num_shards=N"),
        (["certify.num_shards=2", "certify.shard=2"], r"certify.shard \(one of 0..1\) must be an integer"),
        (["certify.num_shards=0", "certify.shard=0"], r"certify.num_shards must be an integer >= 1"),
    ],
)
def test_shard_settings_are_checked_before_anything_starts(given, error):
    from hydra import compose, initialize_config_dir

    from ssn_exp.cli.config import CONF_DIR, ConfigError, check_certify_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ok = check_certify_config(compose(config_name="config", overrides=["certify.num_shards=3", "certify.shard=2"]))
        with pytest.raises(ConfigError, match=error):
            check_certify_config(compose(config_name="config", overrides=given))
    assert (ok.num_shards, ok.shard, ok.lock_name) == (3, 2, ".ssn_exp.shard2of3.lock")


def test_the_shard_jobs_of_a_run_are_one_job_of_its_sweep():
    from ssn_exp.report.missing import jobs_from_params

    got = jobs_from_params({"method": "ssn,dssn"}, ["certify.shard=0,1,2", "certify.num_shards=3"])
    assert got == [["method=ssn"], ["method=dssn"]]  # the report waits for two runs, not six


@pytest.mark.slow
def test_a_resumed_run_continues_its_one_wandb_run_named_with_the_tag(tmp_path):
    from helpers import read_wandb_offline

    run = tmp_path / "run"
    args = ["debug=fast", "logger=wandb", "tag=t1", f"hydra.run.dir={run}", "certify.max_examples=4"]
    for _ in range(2):  # the second start resumes the finished run (a requeued job)
        p = run_cli("ssn_exp", *args)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "deprecat" not in p.stderr.lower() and "no effect" not in p.stderr, p.stderr[-2000:]
    run_id = (run / "wandb_id").read_text().strip()
    logs = sorted(run.glob("wandb/offline-run-*/*.wandb"))
    assert len(logs) == 2
    for log in logs:  # (offline, each start writes its own log; wandb sync uploads both into the one run)
        wb = read_wandb_offline(run, log)
        assert (wb["id"], wb["name"]) == (run_id, "dssn-sigma0.5-seed0-t1")


# small jobs that fit the local Slurm cluster (scripts/slurm_local.sh: 2 CPUs, no GPU, no accounting)
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0"]
SLURM += ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]


def _wait_for_slurm(job_ids, timeout=600):
    import subprocess
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split()
        if not set(job_ids) & set(queue):
            return
        time.sleep(3)
    raise AssertionError(f"Slurm jobs {job_ids} still queued after {timeout} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_shard_jobs_as_a_slurm_array_merge_to_the_single_job_result(tmp_path):
    run = tmp_path / "run"
    p = run_cli("ssn_exp", *FAST, f"hydra.run.dir={run}", "certify.enabled=false")  # trained here, once
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = tmp_path / "model.ckpt"
    shutil.copyfile(run / "checkpoints" / "last.ckpt", ckpt)
    args = [f"ckpt={ckpt}", *FAST[2:5]]
    single = tmp_path / "single"
    p = run_cli("ssn_exp.certify", *args, f"hydra.run.dir={single}")
    assert p.returncode == 0, p.stderr[-2000:]
    sweep = tmp_path / "sweep"  # three shard jobs of one Slurm array, side by side in one run directory
    shards = ["certify.num_shards=3", "certify.shard=0,1,2"]
    p = run_cli("ssn_exp.certify", "--multirun", *args, *shards, f"hydra.sweep.dir={sweep}", *SLURM, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    (done,) = sweep.rglob("metrics.json")
    assert sorted(x.name for x in done.parent.glob("certificates*.csv")) == ["certificates.csv"]
    rows = certificate_columns(read_csv(done.parent / "certificates.csv"))
    assert len(rows) == 9 and rows == certificate_columns(read_csv(single / "certificates.csv"))
    same_metrics(json.loads(done.read_text()), json.loads((single / "metrics.json").read_text()))


@pytest.mark.slurm
@pytest.mark.slow
def test_a_slurm_sweep_returns_once_submitted_and_the_report_follows_the_jobs(tmp_path):
    import re
    import time

    out = tmp_path / "sweep"
    sweep = ["smoke", "debug=fast", "sigma=0.5", "method=dssn,ssn", "certify.max_examples=4", "--out", str(out)]
    start = time.monotonic()
    p = run_cli("ssn_exp.sweep", *sweep, "--launcher", "slurm", *SLURM[1:])
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    ids = re.search(r"submitted 2 Slurm job\(s\): (\S+) (\S+)", p.stdout).groups()
    assert f"results go to {out}" in p.stdout and "squeue -u $USER" in p.stdout and "ssn_exp.report" in p.stdout
    assert time.monotonic() - start < 60 and not (out / "report").exists()  # back before the jobs end
    _wait_for_slurm(ids)
    p = run_cli("ssn_exp.report", str(out), "--out", str(out / "report"))
    assert p.returncode == 0, p.stderr[-2000:]  # exit 0: no job missing
    assert (out / "report" / "missing.txt").read_text().strip() == "none"
    assert len(list(out.glob("*/metrics.json"))) == 2
