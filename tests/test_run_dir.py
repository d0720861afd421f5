"""A failed or refused start changes nothing it did not create (issue 16 §2, §4, §7).

In-process tests drive the real pieces (:class:`RunLock`, the start record of :class:`RunDirGuard`, the
result-file writers); a few CLI runs check the whole path through Hydra, several asserts per run. The refused
restart of a finished run through the CLI is in tests/test_sigterm.py (it reuses a finished run there).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import FAST, hydra_start, run_cli, run_cli_many, tree
from ssn_exp.cli.run_dir import LinkedRunFileError, RunDirGuard, RunLock, RunLockedError, StartRecord


def record(out: Path) -> StartRecord:
    return StartRecord(out, "ssn_exp.log")


# ---------------------------------------------------------------- the start record (in process)


def test_a_failed_start_removes_only_the_folders_it_created(tmp_path):
    existing = tmp_path / "EXISTING_EMPTY"
    existing.mkdir()
    out = existing / "a" / "b" / "run"
    rec = record(out)
    hydra_start(out)
    with RunLock(out):  # the task took the lock, then refused
        pass
    rec.undo()
    assert existing.is_dir() and tree(existing) == {}


def test_a_failed_start_in_a_used_folder_keeps_the_users_files(tmp_path):
    """The working directory as the run directory, with the user's own ssn_exp.log and files in it."""
    (tmp_path / "ssn_exp.log").write_bytes(b"the user's log\n")
    (tmp_path / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    rec = record(tmp_path)
    hydra_start(tmp_path)
    rec.undo()
    assert tree(tmp_path) == before


def test_a_refused_restart_puts_the_record_of_the_finished_run_back_byte_for_byte(tmp_path):
    run = tmp_path / "run"
    hydra_start(run)
    for name in ("config.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"the finished run's {name}\n")
    (run / ".hydra" / "hydra.yaml").unlink()  # a file Hydra will add: removed again
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (run / "metrics.json").write_text("{}")
    before = tree(run)
    rec = record(run)
    hydra_start(run)
    with RunLock(run):
        pass
    assert tree(run) != before
    rec.undo()
    assert tree(run) == before


def test_a_start_that_made_results_is_not_undone(tmp_path):
    run = tmp_path / "run"
    rec = record(run)
    hydra_start(run)
    (run / "certificates.csv").write_text("index\n")  # the run got going before its error
    rec.undo()
    assert (run / "certificates.csv").is_file() and (run / "ssn_exp.log").is_file()


def test_another_process_s_log_and_lock_are_left_alone(tmp_path):
    run = tmp_path / "run"
    hydra_start(run)
    (run / ".hydra" / "config.yaml").write_text("the running process's config\n")
    rec = record(run)
    log_before = (run / "ssn_exp.log").read_bytes()
    hydra_start(run)  # a second start in the directory of a running process, refused by the lock
    (run / "checkpoints").mkdir()  # meanwhile the running process goes on
    with RunLock(run):  # (held here: the record must find the lock taken)
        rec.undo()
        assert (run / ".hydra" / "config.yaml").read_text() == "the running process's config\n"
        assert (run / "ssn_exp.log").read_bytes().startswith(log_before)
        assert (run / "ssn_exp.log").read_bytes() != log_before  # not cut back under the other process
        assert (run / ".ssn_exp.lock").is_file()


@pytest.mark.parametrize("name", ["ssn_exp.log", ".ssn_exp.lock", ".hydra", ".hydra/config.yaml"])
def test_the_callback_refuses_linked_run_files_before_hydra_writes(tmp_path, capsys, name):
    from omegaconf import OmegaConf

    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious\n")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    link = run / name
    if link.is_dir():
        link.rmdir()
    link.symlink_to(outside)
    cfg = OmegaConf.create({"hydra": {"run": {"dir": str(run)}, "job": {"name": "ssn_exp"}}})
    with pytest.raises(SystemExit) as exc:
        RunDirGuard().on_run_start(config=cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {link} is a symbolic link")
    assert outside.read_bytes() == b"precious\n"


# ---------------------------------------------------------------- the lock (§7, symlinks)


def test_a_finished_holder_leaves_no_lock_and_no_stale_pid(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / ".ssn_exp.lock").read_text() == str(os.getpid())
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / ".ssn_exp.lock").exists()
    (tmp_path / ".ssn_exp.lock").write_text("12345")  # an old run's stale lock: not ours to remove
    with RunLock(tmp_path):
        assert (tmp_path / ".ssn_exp.lock").read_text() == str(os.getpid())
    assert (tmp_path / ".ssn_exp.lock").read_text() == ""


def test_a_lock_removed_while_waiting_is_not_locked_twice(tmp_path):
    """A holder unlinks the lock as it ends. A process that opened the old file just before must not count the
    old (unlinked) file's lock as the directory's: it locks the file at the path, and a third process is refused."""
    holder = RunLock(tmp_path).__enter__()

    class EndsBetweenOpenAndLock(RunLock):  # the real RunLock, with the holder ending at the worst moment
        def _open(self):
            fd, created = super()._open()
            if holder._fd is not None:
                holder.__exit__(None, None, None)
            return fd, created

    with EndsBetweenOpenAndLock(tmp_path):
        assert (tmp_path / ".ssn_exp.lock").read_text() == str(os.getpid())
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / ".ssn_exp.lock").exists()


def test_a_linked_lock_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".ssn_exp.lock").symlink_to(outside)
    with pytest.raises(LinkedRunFileError, match="symbolic link"):
        RunLock(run).__enter__()
    assert outside.read_bytes() == b"precious\n"
    (run / ".ssn_exp.lock").unlink()
    (run / ".ssn_exp.lock").symlink_to(tmp_path / "dangling")  # a dangling link is not created through either
    with pytest.raises(LinkedRunFileError):
        RunLock(run).__enter__()
    assert not (tmp_path / "dangling").exists()


# ---------------------------------------------------------------- result files never written through links


def test_result_files_are_never_written_through_a_link(tmp_path):
    from ssn_exp.lightning.results import append_rows, write_json_atomic, write_rows_atomic, write_text_atomic

    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious\n")
    run = tmp_path / "run"
    run.mkdir()
    writers = {
        "metrics.json": lambda p: write_json_atomic(p, {"a": 1}),
        "notes.txt": lambda p: write_text_atomic(p, "x"),
        "certificates.csv": lambda p: write_rows_atomic(p, ["index"], [{"index": 1}]),
        "certificates.rank0.csv": lambda p: append_rows(p, ["index"], [{"index": 1}]),
    }
    for name, write in writers.items():
        (run / name).symlink_to(outside)
        with pytest.raises(LinkedRunFileError, match=f"{name} is a symbolic link"):
            write(run / name)
        assert outside.read_bytes() == b"precious\n", name
        assert (run / name).is_symlink()
    # a temporary file planted as a link is removed (the link, not its target) and written afresh
    (run / f".plain.json.tmp{os.getpid()}").symlink_to(outside)
    write_json_atomic(run / "plain.json", {"b": 2})
    assert outside.read_bytes() == b"precious\n" and (run / "plain.json").read_text().strip().endswith("}")
    assert not (run / f".plain.json.tmp{os.getpid()}").exists()
    append_rows(run / "rows.csv", ["index"], [{"index": 3}])
    append_rows(run / "rows.csv", ["index"], [{"index": 4}])
    assert (run / "rows.csv").read_text() == "3\n4\n"


# ---------------------------------------------------------------- through the entry points (one process each)


@pytest.mark.slow
def test_refused_starts_change_nothing_of_the_users(tmp_path):
    """The issue's cases through Hydra: a pre-existing empty folder above the run, the user's log in the working
    directory used as the run directory, and a linked log and lock (their targets outside stay untouched)."""
    existing = tmp_path / "EXISTING_EMPTY"
    existing.mkdir()
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "ssn_exp.log").write_bytes(b"the user's log\n")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious\n")
    linked = {}
    for name in ("ssn_exp.log", ".ssn_exp.lock"):
        linked[name] = tmp_path / f"linked{name}"
        linked[name].mkdir()
        (linked[name] / name).symlink_to(outside)
    before = {d: tree(d) for d in (existing, cwd, *linked.values())}
    calls = [
        ("ssn_exp", [*FAST, "seed=-1", f"hydra.run.dir={existing / 'run'}"]),
        ("ssn_exp.certify", [f"hydra.run.dir={existing / 'certify'}"]),  # no ckpt= given
        *[("ssn_exp", [*FAST, f"hydra.run.dir={d}"]) for d in linked.values()],
    ]
    results = run_cli_many(calls)
    in_cwd = run_cli("ssn_exp", *FAST, "seed=-1", "hydra.run.dir=.", cwd=cwd)
    for p in [*results, in_cwd]:
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert "seed must be" in results[0].stderr and "symbolic link" in results[2].stderr + results[3].stderr
    assert "symbolic link" in results[3].stderr
    for d, t in before.items():
        assert tree(d) == t, d
    assert outside.read_bytes() == b"precious\n"


@pytest.mark.slow
def test_a_refused_rerun_of_a_finished_run_leaves_every_file_byte_identical(tmp_path):
    """Issue 23 §5: a finished ``debug=fast method=uniform`` run, and its checkpoint certified by
    ``python -m ssn_exp.certify``, then the same commands with other certify settings (and other training
    settings): refused in one line before anything is logged or trained, and both folders stay byte-identical
    (``.hydra/``, ``csv/hparams.yaml``, ``ssn_exp.log``, the checkpoints, the certificates, metrics.json). A rerun
    that would train further (``trainer.max_epochs``) would certify other weights: refused before training too."""
    run, cert = tmp_path / "run", tmp_path / "cert"
    train = ["debug=fast", "method=uniform", "certify.max_examples=4", f"hydra.run.dir={run}"]
    assert run_cli("ssn_exp", *train).returncode == 0
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    recertify = [ckpt, "certify.max_examples=2", "procedure.n=256", "certify.progress=false", f"hydra.run.dir={cert}"]
    assert run_cli("ssn_exp.certify", *recertify).returncode == 0
    before = {d: tree(d) for d in (run, cert)}
    assert {"csv/hparams.yaml", "ssn_exp.log", ".hydra/config.yaml", "certificates.csv"} <= set(before[run])
    calls = [("ssn_exp", [*train, "procedure.n=300"]), ("ssn_exp.certify", [*recertify, "procedure.n=300"])]
    refused = [*run_cli_many(calls, workers=2)]
    refused += [run_cli("ssn_exp", *train, more) for more in ("training.epochs=2", "trainer.max_epochs=2")]
    for d, t in before.items():
        assert tree(d) == t, d
    texts = ["other settings (n: 256 -> 300)"] * 2 + ["different settings (scheduler.T_max)", "more training"]
    for p, text in zip(refused, texts, strict=True):
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1 and text in errors[0], p.stderr[-3000:]
