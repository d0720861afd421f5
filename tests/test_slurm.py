"""hydra/launcher=slurm: what a job asks Slurm for, and jobs on a real Slurm cluster (hydra-submitit-launcher's
sbatch/srun; the tests marked ``slurm``): the one-node cluster of ``scripts/slurm_local.sh``, which ``.ci/run``
starts; they skip where none answers (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import certificate_columns, one_error_line, read_csv, read_metrics, run_cli, run_cli_many
from test_config import _compose

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
