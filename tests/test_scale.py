"""Scale-out and faults: 2-process DDP (gloo, CPU) in single runs and --multirun, submitit_local
sweeps, and resume after real subprocesses are killed."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from helpers import certificate_columns, read_csv, read_metrics, run_cli, run_cli_many, start_cli, succeeded
from test_run_dir import tree
from test_sigterm import _one_sigterm_line, _start, _terminate_when

pytestmark = pytest.mark.slow

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def test_ddp_training_certification_and_certify_entry_match_single_process(tmp_path):
    run = tmp_path / "ddp_run"
    p = succeeded(
        run_cli("ssn_exp", "debug=fast", *DDP, f"hydra.run.dir={run}", "certify.max_examples=30", "sigma=0.75")
    )
    chatter = ("srun", "LeafSpec", "logging interval", "Tip:")  # the spawned ranks are as quiet as one process
    assert not [c for c in chatter if c in p.stdout + p.stderr], p.stderr[-3000:]
    rows = read_csv(run / "certificates.csv")
    assert [int(r["index"]) for r in rows] == list(range(30))  # every example exactly once, in order
    assert not list(run.glob("certificates.rank*.csv"))
    ckpt = run / "checkpoints" / "last.ckpt"
    single = tmp_path / "single"
    succeeded(run_cli("ssn_exp.certify", f"ckpt={ckpt}", f"hydra.run.dir={single}", "certify.max_examples=30"))
    assert certificate_columns(read_csv(single / "certificates.csv")) == certificate_columns(rows)
    # python -m ssn_exp.certify with 2 processes, a skip, and a batch size that splits shards unevenly
    sharded = tmp_path / "sharded"
    extra = ["certify.skip=3", "certify.batch_size=4", "certify.max_examples=41"]
    p = succeeded(run_cli("ssn_exp.certify", f"ckpt={ckpt}", *DDP, f"hydra.run.dir={sharded}", *extra))
    assert not [c for c in chatter if c in p.stdout + p.stderr], p.stderr[-3000:]
    single2 = tmp_path / "single2"
    succeeded(run_cli("ssn_exp.certify", f"ckpt={ckpt}", f"hydra.run.dir={single2}", *extra))
    a, b = read_csv(sharded / "certificates.csv"), read_csv(single2 / "certificates.csv")
    assert [int(r["index"]) for r in a] == list(range(0, 123, 3))
    assert certificate_columns(a) == certificate_columns(b)
    ma, mb = read_metrics(sharded), read_metrics(single2)
    assert {k: v for k, v in ma.items() if k != "seconds_per_example"} == {
        k: v for k, v in mb.items() if k != "seconds_per_example"
    }


def test_ddp_inside_multirun(tmp_path):
    out = tmp_path / "mr"
    succeeded(
        run_cli("ssn_exp", "--multirun", "debug=fast", *DDP, "sigma=0.5,1.0", f"hydra.sweep.dir={out}", timeout=600)
    )
    done = sorted(d for d in out.iterdir() if (d / "metrics.json").is_file())
    assert [read_metrics(d)["sigma"] for d in done] == [0.5, 1.0]


def test_submitit_local_launcher_runs_the_smoke_sweep(tmp_path):
    out = tmp_path / "sw"
    succeeded(run_cli("ssn_exp.sweep", "smoke", "debug=fast", "method=dssn", "--launcher", "local", "--out", str(out)))
    done = [d for d in out.iterdir() if (d / "metrics.json").is_file()]
    assert sorted(read_metrics(d)["sigma"] for d in done) == [0.25, 0.5, 1.0]
    assert (out / ".submitit").is_dir()
    assert (out / "report" / "best_over_sigma.csv").is_file()


def _popen(module, *overrides):
    return start_cli(module, *overrides, stderr=False)


def _kill_when(proc, ready, timeout=120):
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _without(rows, *columns):
    return [{k: v for k, v in r.items() if k not in columns} for r in rows]


def test_killed_training_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    """kill -9, or SIGTERM (what Slurm and submitit send: a non-zero exit with one line), after some epochs, then
    the same command again: the final weights, the certificates and the whole training log equal those of a run
    that never stopped (every RNG the training uses is restored). A refused restart of the finished run (other
    settings; resume=false) then leaves it byte-identical."""
    common = ["training.epochs=5", "data.batch_size=16", "certify.max_examples=20", "trainer.check_val_every_n_epoch=2"]
    common += ["trainer.enable_progress_bar=false", "certify.progress=false", "method=ssn", "procedure.n=500"]
    ref, run, term = tmp_path / "ref", tmp_path / "run", tmp_path / "term"
    succeeded(run_cli("ssn_exp", *common, f"hydra.run.dir={ref}"))

    def some_epochs_done(folder):
        def ready():
            last = folder / "checkpoints" / "last.ckpt"
            try:
                return last.is_file() and torch.load(last, map_location="cpu", weights_only=True)["epoch"] >= 1
            except Exception:  # being written
                return False

        return ready

    killed = _popen("ssn_exp", *common, f"hydra.run.dir={run}")
    terminated = _start("ssn_exp", *common, f"hydra.run.dir={term}")
    _kill_when(killed, some_epochs_done(run))
    err = _terminate_when(terminated, some_epochs_done(term))
    _one_sigterm_line(terminated, err, "training")
    assert not (term / ".ssn_exp.lock").exists()  # the lock went with the process
    for folder in (run, term):
        stopped_at = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"]
        assert stopped_at < 4 and not (folder / "metrics.json").exists()
        log_before = read_csv(folder / "csv" / "metrics.csv")
        assert [int(r["epoch"]) for r in log_before][: stopped_at + 1] == list(range(stopped_at + 1))
    for p in run_cli_many([("ssn_exp", [*common, f"hydra.run.dir={folder}"]) for folder in (run, term)], workers=2):
        assert "resuming from" in succeeded(p).stdout + p.stderr
    a = torch.load(ref / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    log_ref = read_csv(ref / "csv" / "metrics.csv")
    for folder in (run, term):
        b = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert (b["epoch"], b["global_step"]) == (a["epoch"], a["global_step"]) == (4, 5 * 90)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
        assert certificate_columns(read_csv(folder / "certificates.csv")) == certificate_columns(
            read_csv(ref / "certificates.csv")
        )
        # the whole training log: one row per epoch, the same numbers (the certification timing aside)
        log_run = read_csv(folder / "csv" / "metrics.csv")
        assert [r["epoch"] for r in log_run] == [str(e) for e in range(5)] + [""]
        assert _without(log_run, "certify/seconds_per_example") == _without(log_ref, "certify/seconds_per_example")
        lock = folder / ".ssn_exp.lock"  # no stale pid (kill -9 left the file: the resume empties it)
        assert not lock.exists() or lock.read_text() == ""
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


def test_killed_certification_skips_finished_examples_and_ends_equal(tmp_path):
    """kill -9, or SIGTERM (one line, exit 143), during certification; the same command again certifies only the
    rest and ends with the certificates of a certification that never stopped."""
    trained = tmp_path / "trained"
    succeeded(run_cli("ssn_exp", "debug=fast", "sigma=3.5", "certify.enabled=false", f"hydra.run.dir={trained}"))
    ckpt = trained / "checkpoints" / "last.ckpt"
    slow = ["certify.noise_batch=1", "certify.batch_size=1", "certify.max_examples=40", "certify.progress=false"]
    ref = tmp_path / "ref"
    succeeded(run_cli("ssn_exp.certify", f"ckpt={ckpt}", f"hydra.run.dir={ref}", *slow))
    out, term = tmp_path / "out", tmp_path / "term"

    def some_rows(folder):
        return lambda: (
            (folder / "certificates.csv").is_file() and (folder / "certificates.csv").read_text().count("\n") > 8
        )

    killed = _popen("ssn_exp.certify", f"ckpt={ckpt}", f"hydra.run.dir={out}", *slow)
    terminated = _start("ssn_exp.certify", f"ckpt={ckpt}", f"hydra.run.dir={term}", *slow)
    _kill_when(killed, some_rows(out))
    err = _terminate_when(terminated, some_rows(term))
    _one_sigterm_line(terminated, err, "certification")
    for folder in (out, term):
        partial = (folder / "certificates.csv").read_text().count("\n") - 1
        assert 8 <= partial < 40 and not (folder / "metrics.json").exists()
    calls = [("ssn_exp.certify", [f"ckpt={ckpt}", f"hydra.run.dir={folder}", *slow]) for folder in (out, term)]
    for p, folder in zip(run_cli_many(calls, workers=2), (out, term), strict=True):
        succeeded(p)
        final = read_csv(folder / "certificates.csv")
        assert certificate_columns(final) == certificate_columns(read_csv(ref / "certificates.csv"))
        a, b = read_metrics(folder), read_metrics(ref)
        assert {k: v for k, v in a.items() if k != "seconds_per_example"} == {
            k: v for k, v in b.items() if k != "seconds_per_example"
        }
