"""Jobs on a real Slurm cluster (hydra/launcher=slurm, hydra-submitit-launcher's sbatch/srun): the one-node cluster
of ``scripts/slurm_local.sh``, which ``.ci/run`` starts; skipped where none answers (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import certificate_columns, read_csv, read_metrics, run_cli, run_cli_many

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# small jobs that fit the local cluster (2 CPUs, no GPU, no accounting); the job's 2 processes share its CPU
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
SLURM += ["hydra.launcher.timeout_min=10", "hydra.launcher.max_num_timeout=0"]


def _ok(p):
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return p


def _job_dir(sweep: Path) -> Path:
    (done,) = sweep.rglob("metrics.json")  # (a multirun certification's job folder is named after the ckpt path)
    return done.parent


def _same_metrics(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert {k: v for k, v in ma.items() if k != "seconds_per_example"} == {
        k: v for k, v in mb.items() if k != "seconds_per_example"
    }


def test_ddp_under_slurm_trains_and_certifies_like_one_process(tmp_path):
    """trainer=ddp trainer.devices=2 through Slurm: one job whose task spawns 2 gloo processes (the launcher asks
    for the trainer's devices). Its certificates, and those of ``python -m ssn_exp.certify`` of its checkpoint as
    a 2-process Slurm job, equal a single local process's certification of that checkpoint, row for row."""
    common = ["debug=fast", "method=dssn", "certify.max_examples=24", "certify.progress=false"]
    trained = tmp_path / "trained"
    _ok(run_cli("ssn_exp", "--multirun", *common, *DDP, *SLURM, f"hydra.sweep.dir={trained}", timeout=600))
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
    _ok(p_slurm), _ok(p_single)
    want = certificate_columns(read_csv(single / "certificates.csv"))
    assert certificate_columns(rows) == want
    assert certificate_columns(read_csv(_job_dir(certified) / "certificates.csv")) == want
    _same_metrics(_job_dir(certified), single)
