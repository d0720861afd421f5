"""hydra/launcher=slurm: what a job asks Slurm for, and jobs on a real Slurm cluster (hydra-submitit-launcher's
sbatch/srun; the tests marked ``slurm``): the one-node cluster of ``scripts/slurm_local.sh``, which ``.ci/run``
starts; they skip where none answers (tests/conftest.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    ROOT,
    certificate_columns,
    one_error_line,
    read_csv,
    read_metrics,
    run_cli,
    run_cli_many,
    same_metrics,
    succeeded,
)
from test_config import _compose

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# small jobs that fit the local cluster (2 CPUs, no GPU, no accounting); the job's 2 processes share its CPU
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
SLURM += ["hydra.launcher.timeout_min=10", "hydra.launcher.max_num_timeout=0"]


def _job_dir(sweep: Path) -> Path:
    (done,) = sweep.rglob("metrics.json")  # (a multirun certification's job folder is named after the ckpt path)
    return done.parent


@pytest.mark.parametrize(
    "overrides,gpus",
    [([], 0), (["trainer=gpu"], 1), (["trainer=ddp", "trainer.devices=4"], 4), (["trainer=ddp", *DDP[1:]], 0)],
)
def test_the_launcher_asks_for_the_trainers_devices(overrides, gpus):
    cfg = _compose(["hydra/launcher=slurm", *overrides])
    assert cfg.hydra.launcher.gpus_per_node == gpus and cfg.hydra.launcher.tasks_per_node == 1


def test_a_device_count_slurm_cannot_ask_for_is_one_line(tmp_path):
    """Needs no cluster: the launcher's config is resolved before anything is submitted, and nothing is made."""
    calls = [["trainer=ddp"], ["trainer.accelerator=cpu", "+trainer.num_nodes=2"]]
    outs = [tmp_path / str(i) for i in range(len(calls))]
    results = run_cli_many(
        [("ssn_exp", ["--multirun", "hydra/launcher=slurm", *c, f"hydra.sweep.dir={o}"]) for c, o in zip(calls, outs)],
        workers=2,
    )
    lines = [one_error_line(p) for p in results]
    assert "give it as a number (e.g. trainer.devices=4), not -1" in lines[0]
    assert "trainer.num_nodes=2 is not supported" in lines[1]
    assert not any(o.exists() for o in outs)


@pytest.mark.slurm
@pytest.mark.slow
def test_ddp_under_slurm_trains_and_certifies_like_one_process(tmp_path):
    """trainer=ddp trainer.devices=2 through Slurm: one job whose task spawns 2 gloo processes (the launcher asks
    for the trainer's devices). Its certificates, and those of ``python -m ssn_exp.certify`` of its checkpoint as
    a 2-process Slurm job, equal a single local process's certification of that checkpoint, row for row."""
    common = ["debug=fast", "method=dssn", "certify.max_examples=24", "certify.progress=false"]
    trained = tmp_path / "trained"
    succeeded(run_cli("ssn_exp", "--multirun", *common, *DDP, *SLURM, f"hydra.sweep.dir={trained}", timeout=600))
    run = _job_dir(trained)
    ckpt = run / "checkpoints" / "last.ckpt"
    rows = read_csv(run / "certificates.csv")
    assert [int(r["index"]) for r in rows] == list(range(24))
    single, certified = tmp_path / "single", tmp_path / "certified"
    p_slurm, p_single = run_cli_many(
        [
            (
                "ssn_exp.certify",
                ["--multirun", f"ckpt='{ckpt}'", *common[2:], *DDP, *SLURM, f"hydra.sweep.dir={certified}"],
            ),
            ("ssn_exp.certify", [f"ckpt='{ckpt}'", *common[2:], f"hydra.run.dir={single}"]),
        ],
        workers=2,
    )
    succeeded(p_slurm), succeeded(p_single)
    want = certificate_columns(read_csv(single / "certificates.csv"))
    assert certificate_columns(rows) == want
    assert certificate_columns(read_csv(_job_dir(certified) / "certificates.csv")) == want
    same_metrics(read_metrics(_job_dir(certified)), read_metrics(single))


# --- preemption and time limits: a job Slurm requeues resumes from its run directory ----------------------------

# Training long enough to be caught mid-way (more, smaller epochs than debug=fast's) and a certification of one
# example per step (a row per example), slow enough to be caught between rows.
_RESUMABLE = ["debug=fast", "method=uniform", "training.epochs=30", "trainer.limit_train_batches=20"]
_RESUMABLE += ["certify.max_examples=16", "certify.batch_size=1"]


def _poll(what: str, until, proc, timeout: float = 240.0, every: float = 0.2):
    """``until()``'s first truthy value, polling; fails (never hangs) when the job's launcher exits or time is out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = until()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the launcher exited ({proc.returncode}) waiting for {what}: {proc.log.read_text()[-3000:]}")
        time.sleep(every)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _scontrol(*args: str) -> str:
    import subprocess

    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30).stdout


def _job_state(job: str) -> dict:
    out = _scontrol("show", "job", job)
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _requeued(job: str, proc, restarts: int) -> None:
    """Wait until Slurm has stopped the job for its ``restarts``-th requeue; it is then pending."""
    _poll(
        f"requeue {restarts} of job {job}",
        lambda: (s := _job_state(job)).get("Restarts") == str(restarts) and s.get("JobState") == "PENDING",
        proc,
        timeout=120,
    )


def _start_now(job: str) -> None:
    """Slurm holds a requeued batch job for two minutes (BeginTime); the test lets it start at once."""
    if _job_state(job).get("Reason") == "BeginTime":
        _scontrol("update", f"jobid={job}", "StartTime=now")


def _launch(sweep: Path, *overrides: str):
    """``python -m ssn_exp --multirun`` through the Slurm launcher, in the background (it waits for its job)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    args = [sys.executable, "-m", "ssn_exp", "--multirun", *overrides, f"hydra.sweep.dir={sweep}"]
    log = sweep.with_suffix(".log")  # (a file, not a pipe: submitit's polling warnings would fill one)
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _cancel(job: str, proc) -> None:
    """Nothing left behind by a failed test: its job cancelled, its launcher stopped."""
    import subprocess

    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    proc.kill()
    proc.wait()


def _job_id(sweep: Path, proc) -> str:
    return _poll("the job id", lambda: [p.name for p in (sweep / ".submitit").glob("*") if p.name.isdigit()], proc)[0]


def _rows(run: Path) -> int:
    f = run / "certificates.csv"
    return max(0, len(f.read_text().splitlines()) - 1) if f.is_file() else 0


def _same_as_uninterrupted(sweep: Path, local: Path, proc) -> None:
    assert proc.wait(timeout=480) == 0, proc.log.read_text()[-4000:]
    run = _job_dir(sweep)
    assert certificate_columns(read_csv(run / "certificates.csv")) == certificate_columns(
        read_csv(local / "certificates.csv")
    )
    drop = ("seconds_per_example",)
    assert {k: v for k, v in read_metrics(run).items() if k not in drop} == {
        k: v for k, v in read_metrics(local).items() if k not in drop
    }
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (run, local))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _resumes(sweep: Path) -> int:
    """How many times the job's reruns resumed from the run's ``last.ckpt`` (its log holds every run's lines)."""
    return "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out")).count("resuming from ")


def _local_run(local: Path, overrides: list[str]):
    """The same command run locally without interruption (in a thread, alongside the Slurm job)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(run_cli, "ssn_exp", *overrides, f"hydra.run.dir={local}", timeout=400)
    pool.shutdown(wait=False)
    return future


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_requeued_in_training_and_in_certification_ends_as_an_uninterrupted_run(tmp_path, request):
    """``scontrol requeue`` (what a preemption does) while the job trains, and again while it certifies: Slurm
    kills and reruns the same command, which resumes from ``last.ckpt`` and then from the certificates' rows."""
    overrides = [*_RESUMABLE, "procedure.n=20000"]
    sweep, local = tmp_path / "sweep", tmp_path / "local"
    proc = _launch(sweep, *overrides, *SLURM)
    uninterrupted = _local_run(local, overrides)
    job = _job_id(sweep, proc)
    request.addfinalizer(lambda: _cancel(job, proc))
    (ckpt,) = _poll("the first epoch's checkpoint", lambda: list(sweep.rglob("checkpoints/last.ckpt")), proc)
    run = ckpt.parents[1]
    assert not (run / "metrics.json").exists() and _rows(run) == 0
    _scontrol("requeue", job)
    _requeued(job, proc, 1)
    assert torch.load(ckpt, weights_only=True)["epoch"] < 29 and _rows(run) == 0  # stopped in training
    _start_now(job)
    _poll("a certified row", lambda: _rows(run) > 0, proc, every=0.1)
    _scontrol("requeue", job)
    _requeued(job, proc, 2)
    kept = read_csv(run / "certificates.csv")
    assert 0 < len(kept) < 16  # stopped in certification
    _start_now(job)
    succeeded(uninterrupted.result())
    _same_as_uninterrupted(sweep, local, proc)
    assert _resumes(sweep) == 2  # from last.ckpt both times
    rows = read_csv(run / "certificates.csv")  # and the rows certified before the second requeue were kept, not redone
    by_index = {r["index"]: r for r in rows}
    assert [by_index[r["index"]] for r in kept] == kept  # (their `seconds` too: a run's timings are its own)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_past_its_time_limit_is_requeued_and_ends_as_an_uninterrupted_run(tmp_path, request):
    """A one-minute time limit with the launcher's signal 30 s before it: submitit requeues the job when signalled
    and the rerun resumes where it stopped. The job's work (~40 s on an idle 2-core machine) needs the requeue;
    the test then gives the requeued job 10 minutes (scontrol update TimeLimit), so that a busy machine, which
    would need many, ends in one more run."""
    overrides = [*_RESUMABLE[:-2], "certify.max_examples=32", "certify.batch_size=1", "procedure.n=8000"]
    limit = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_num_timeout=2"]
    sweep, local = tmp_path / "sweep", tmp_path / "local"
    proc = _launch(sweep, *overrides, *SLURM[:3], *limit)
    uninterrupted = _local_run(local, overrides)
    job = _job_id(sweep, proc)
    request.addfinalizer(lambda: _cancel(job, proc))
    _requeued(job, proc, 1)
    trained = bool(list(sweep.rglob("checkpoints/last.ckpt")))  # (a very busy machine may not get that far)
    _scontrol("update", f"jobid={job}", "TimeLimit=10")
    _start_now(job)
    succeeded(uninterrupted.result())
    _same_as_uninterrupted(sweep, local, proc)
    assert _resumes(sweep) == int(trained)


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp"])
def test_inside_a_slurm_job_lightning_takes_neither_the_ranks_nor_the_requeue(trainer, monkeypatch):
    """Every trainer config names Lightning's plain environment: inside a Slurm job (its variables set) Lightning's
    Slurm environment would give every ddp_spawn process the task's rank and install its own SIGUSR1 requeue beside
    submitit's."""
    from hydra.utils import instantiate
    from pytorch_lightning.plugins.environments import LightningEnvironment

    for key, value in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_JOB_NAME", "job")
    cfg = _compose(
        [f"trainer={trainer}", "trainer.accelerator=cpu"] + (["trainer.devices=2"] if trainer == "ddp" else [])
    )
    built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert type(built._accelerator_connector.cluster_environment) is LightningEnvironment
