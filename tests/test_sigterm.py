"""SIGTERM (what Slurm and submitit send before a time limit or preemption): a non-zero exit with one line, and
the same command resumes to exactly the result of a run that never stopped (issue 16 §3). The finished run of the
training test also checks that a refused restart leaves a finished run byte-identical (§2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, certificate_columns, read_csv, read_metrics, run_cli, run_cli_many
from test_run_dir import tree


def _ok(p):
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return p


def _start(module, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.Popen(
        [sys.executable, "-m", module, *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


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


def _same_metrics(a, b):
    drop = ("seconds_per_example",)
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


@pytest.mark.slow
def test_sigterm_during_training_exits_non_zero_and_the_rerun_equals_an_uninterrupted_run(tmp_path):
    common = ["debug=fast", "training.epochs=3", "trainer.limit_train_batches=12", "method=ssn"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = _start("ssn_exp", *common, f"hydra.run.dir={ref}")
    last = run / "checkpoints" / "last.ckpt"

    def first_epoch_saved():
        try:
            return torch.load(last, map_location="cpu", weights_only=True)["epoch"] >= 0
        except Exception:  # not there yet, or being written
            return False

    proc = _start("ssn_exp", *common, f"hydra.run.dir={run}")
    err = _terminate_when(proc, first_epoch_saved)
    _one_sigterm_line(proc, err, "training")
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert stopped_at < 2 and not (run / "metrics.json").exists()
    assert not (run / ".ssn_exp.lock").exists()  # the lock went with the process
    p = _ok(run_cli("ssn_exp", *common, f"hydra.run.dir={run}"))
    assert "resuming from" in p.stdout + p.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    a = torch.load(ref / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert (b["epoch"], b["global_step"]) == (a["epoch"], a["global_step"]) == (2, 3 * 12)
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert certificate_columns(read_csv(run / "certificates.csv")) == certificate_columns(
        read_csv(ref / "certificates.csv")
    )
    _same_metrics(read_metrics(run), read_metrics(ref))
    assert not (run / ".ssn_exp.lock").exists() and not (ref / ".ssn_exp.lock").exists()  # no stale pid (§7)
    # A refused restart of the finished run (other settings; resume=false) leaves it byte-identical (§2)
    before = tree(ref)
    calls = [
        ("ssn_exp", [*common, "optimizer.lr=0.05", f"hydra.run.dir={ref}"]),
        ("ssn_exp", [*common, "resume=false", f"hydra.run.dir={ref}"]),
    ]
    texts = ["different settings (optimizer.lr)", "pass resume=true"]
    for p, text in zip(run_cli_many(calls, workers=1), texts, strict=True):
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and text in lines[0], p.stderr[-3000:]
        assert tree(ref) == before


@pytest.mark.slow
def test_sigterm_during_certification_exits_non_zero_and_the_rerun_equals_an_uninterrupted_one(tmp_path):
    trained = tmp_path / "trained"
    _ok(run_cli("ssn_exp", "debug=fast", "sigma=3.5", "certify.enabled=false", f"hydra.run.dir={trained}"))
    ckpt = trained / "checkpoints" / "last.ckpt"
    slow = ["certify.n=1000", "certify.noise_batch=10", "certify.batch_size=1", "certify.max_examples=40"]
    slow += ["certify.progress=false"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    reference = _start("ssn_exp.certify", f"ckpt={ckpt}", f"hydra.run.dir={ref}", *slow)
    csv_path = out / "certificates.csv"

    def some_rows():
        return csv_path.is_file() and csv_path.read_text().count("\n") > 5

    proc = _start("ssn_exp.certify", f"ckpt={ckpt}", f"hydra.run.dir={out}", *slow)
    err = _terminate_when(proc, some_rows)
    _one_sigterm_line(proc, err, "certification")
    partial = csv_path.read_text().count("\n") - 1
    assert 5 <= partial < 40 and not (out / "metrics.json").exists()
    _ok(run_cli("ssn_exp.certify", f"ckpt={ckpt}", f"hydra.run.dir={out}", *slow))
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    assert certificate_columns(read_csv(csv_path)) == certificate_columns(read_csv(ref / "certificates.csv"))
    _same_metrics(read_metrics(out), read_metrics(ref))


def test_the_sigterm_line_names_certification_when_certification_is_interrupted():
    """Certification after training runs inside ``python -m ssn_exp``: the line must say what was stopped."""
    from ssn_exp.cli.errors import _phase

    def certify_module():  # a frame of the certification code on the stack
        return _phase(sys._getframe())

    def fit():
        return _phase(sys._getframe())

    assert certify_module() == "certification"
    assert fit() == "training"
