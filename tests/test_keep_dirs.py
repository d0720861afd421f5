"""A failed or refused start removes only what it created, never a folder that was there before (issue 17, item 8).

The start records (:class:`StartRecord` for a run, :class:`SweepRecord` for a multirun's sweep directory) make
the missing folders themselves, one ``os.mkdir`` at a time, so they know exactly which folders this process
created: not by guessing from which paths were missing when they looked, which counts a folder someone else
made meanwhile (or one put back at the same path) as its own, and misses the folders Hydra makes for a path
with ``..`` in it. In-process tests drive the real records and callback; one batch of CLI runs checks the
whole path through Hydra (both entry points, a multirun, an error of Hydra's own around the task).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FAST, hydra_start, one_error_line, run_cli_many, tree
from ssn_exp.cli.run_dir import (
    RunDirGuard,
    RunLock,
    RunLockedError,
    StartRecord,
    SweepRecord,
    _make_dirs,
    _remove_created_dirs,
)
from ssn_exp.exceptions import UserError


def failed_start(out: Path | str) -> None:
    """A whole failed start: record, Hydra's files, the task's lock, the undo of guard()."""
    rec = StartRecord(out, "ssn_exp.log")
    hydra_start(out)
    with RunLock(Path(os.path.abspath(out))):  # the task took the lock, then refused
        pass
    rec.undo()


def sweeper_start(sweep_dir: Path) -> None:
    """What Hydra's sweeper writes before the first job: the sweep directory and its multirun.yaml."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "multirun.yaml").write_text("hydra: {new: sweep}\n")


# ---------------------------------------------------------------- runs: exactly the folders this start made


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(1, 5),
    data=st.data(),
)
def test_a_failed_start_keeps_every_folder_that_was_there_before_at_any_depth(depth, data):
    """Any chain of parents, any prefix of it there before (empty, or holding the user's files and folders)."""
    there = data.draw(st.integers(0, depth), label="levels there before")  # depth: the run dir itself existed
    filled = data.draw(st.sets(st.integers(0, max(there - 1, 0)), max_size=there), label="levels with user files")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "EXISTING"
        root.mkdir()
        chain = [root.joinpath(*[f"d{i}" for i in range(k + 1)]) for k in range(depth)]
        for k in range(there):
            chain[k].mkdir()
        for k in filled:
            if k < there:
                (chain[k] / "mine.txt").write_text(f"user file {k}\n")
                (chain[k] / f"empty{k}").mkdir()
        before = tree(root)
        failed_start(chain[-1])
        assert root.is_dir() and tree(root) == before


def test_a_folder_put_back_at_a_made_path_is_not_removed(tmp_path):
    """The start made E/a/b/run; meanwhile the user replaced E/a by a folder of their own (empty): it stays."""
    existing = tmp_path / "EXISTING_EMPTY"
    existing.mkdir()
    out = existing / "a" / "b" / "run"
    rec = StartRecord(out, "ssn_exp.log")
    hydra_start(out)
    shutil.rmtree(existing / "a")
    (existing / "a").mkdir()  # the user's own folder, at the path the start had made one
    rec.undo()
    assert tree(existing) == {"a": None}


def test_the_record_makes_the_folders_before_hydra_can(tmp_path):
    """No window between recording and making: the folders exist once the record is taken, and a second start
    (another process) that finds them there counts none of them as its own."""
    out = tmp_path / "EXISTING_EMPTY" / "a" / "run"
    (tmp_path / "EXISTING_EMPTY").mkdir()
    first = StartRecord(out, "ssn_exp.log")
    assert out.is_dir()
    assert [d for d, _ in first.created_dirs] == [out, out.parent]
    second = StartRecord(out / "inner", "ssn_exp.log")
    assert [d for d, _ in second.created_dirs] == [out / "inner"]
    second.undo()
    assert out.is_dir() and tree(out) == {}


def test_a_run_dir_with_dotdot_removes_the_folders_hydra_made_on_the_way(tmp_path):
    """hydra.run.dir=E/x/../y/run: Hydra's mkdir(parents=True) makes E/x too (it does not fold ".."). A folder
    that was there (E/keep/) stays; the ones this start made go, E/x included."""
    existing = tmp_path / "EXISTING"
    (existing / "keep").mkdir(parents=True)
    for run_dir in (f"{existing}/x/../y/run", f"{existing}/keep/../z/run"):
        failed_start(run_dir)
        assert tree(existing) == {"keep": None}, run_dir
    made = _make_dirs(f"{existing}/a/../a/b")  # "a/.." and "a/../a" exist once "a" is made: not made twice
    assert [d for d, _ in made] == [existing / "a/../a/b", existing / "a"]
    _remove_created_dirs(made)
    assert tree(existing) == {"keep": None}


def test_a_run_dir_that_cannot_be_made_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """E/a/<a name too long>/run: E/a is made, the next folder cannot be; E/a is removed again, one line."""
    from omegaconf import OmegaConf

    existing = tmp_path / "EXISTING_EMPTY"
    existing.mkdir()
    run = existing / "a" / ("n" * 300) / "run"
    cfg = OmegaConf.create({"hydra": {"run": {"dir": str(run)}, "job": {"name": "ssn_exp"}}})
    with pytest.raises(SystemExit) as exc:
        RunDirGuard().on_run_start(config=cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "File name too long" in err[0], err
    assert tree(existing) == {}


# ---------------------------------------------------------------- multirun: the sweep directory


def test_a_sweep_that_fails_before_any_job_leaves_the_folders_as_they_were(tmp_path):
    existing = tmp_path / "EXISTING_EMPTY"
    existing.mkdir()
    sweep = existing / "sweeps" / "s1"
    rec = SweepRecord(sweep)
    assert sweep.is_dir()
    sweeper_start(sweep)
    assert rec.undo() is True
    assert tree(existing) == {}


def test_a_refused_rerun_of_a_sweep_puts_its_multirun_yaml_back_byte_for_byte(tmp_path):
    sweep = tmp_path / "sweep"
    job = sweep / "method=dssn"
    job.mkdir(parents=True)
    (job / "metrics.json").write_text("{}")
    (sweep / "multirun.yaml").write_bytes(b"the earlier sweep's record\n")
    before = tree(tmp_path)
    rec = SweepRecord(sweep)
    sweeper_start(sweep)
    assert rec.undo() is True
    assert tree(tmp_path) == before


def test_a_sweep_whose_jobs_started_is_not_undone(tmp_path):
    existing = tmp_path / "EXISTING_EMPTY"
    existing.mkdir()
    sweep = existing / "sweep"
    rec = SweepRecord(sweep)
    sweeper_start(sweep)
    (sweep / "method=dssn").mkdir()  # a job's folder (a launcher may run the job in another process)
    assert rec.undo() is False
    assert (sweep / "multirun.yaml").is_file() and (sweep / "method=dssn").is_dir()
    (sweep / "method=dssn").rmdir()
    rec.jobs_started = 1  # a job started in this process (RunDirGuard.on_job_start)
    assert rec.undo() is False and (sweep / "multirun.yaml").is_file()


def test_the_callback_records_the_sweep_directory_the_sweeper_writes(tmp_path):
    """hydra.sweep.dir with ${now:...}: the callback's folder is the one the sweeper resolves later (cached)."""
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    setup_globals()
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": f"{tmp_path}/" + "${now:%H-%M-%S-%f}"}}})
    RunDirGuard().on_multirun_start(config=cfg)
    time.sleep(0.01)
    made = [p.name for p in tmp_path.iterdir()]
    assert made == [Path(cfg.hydra.sweep.dir).name]
    assert SweepRecord.current is not None and SweepRecord.current.dir == tmp_path / made[0]
    RunDirGuard().on_job_start(config=cfg)
    assert SweepRecord.current.jobs_started == 1
    SweepRecord.current = None


def test_a_linked_multirun_yaml_is_refused_and_its_target_untouched(tmp_path, capsys):
    from omegaconf import OmegaConf

    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious\n")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").symlink_to(outside)
    with pytest.raises(SystemExit) as exc:
        RunDirGuard().on_multirun_start(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multirun.yaml is a symbolic link" in err[0] and "hydra.sweep.dir=DIR" in err[0]
    assert outside.read_bytes() == b"precious\n"


# ---------------------------------------------------------------- through the entry points (one batch)


@pytest.mark.slow
def test_failed_starts_through_hydra_keep_what_was_there(tmp_path):
    """A multirun whose job config does not compose; a run dir with ".." (training) and one for certification
    under a folder that existed; a run dir whose .hydra is a file (Hydra's own error around the task)."""
    existing = tmp_path / "EXISTING_EMPTY"
    (existing / "keep").mkdir(parents=True)
    (existing / "used" / ".hydra").mkdir(parents=True)
    (existing / "used" / ".hydra").rmdir()
    (existing / "used" / ".hydra").write_text("a file, not Hydra's folder\n")
    before = tree(existing)
    calls = [
        ("ssn_exp", [*FAST, "method=bogus,dssn", f"hydra.sweep.dir={existing}/sweeps/s1", "--multirun"]),
        ("ssn_exp", [*FAST, "seed=-1", f"hydra.run.dir={existing}/x/../keep/run"]),
        ("ssn_exp.certify", [f"hydra.run.dir={existing}/c/../keep/certify"]),  # no ckpt= given
        ("ssn_exp", [*FAST, f"hydra.run.dir={existing}/used"]),
    ]
    sweep, train, certify, hydra_error = (one_error_line(p) for p in run_cli_many(calls))
    assert sweep.startswith("error: the sweep did not start: ") and "method/bogus" in sweep, sweep
    assert "seed must be" in train and "ckpt=PATH" in certify
    assert ".hydra" in hydra_error and "File exists" in hydra_error, hydra_error
    assert tree(existing) == before


@pytest.fixture
def multirun_job(tmp_path):
    """Hydra's config of a multirun job in ``tmp_path/sweep/job`` (what guard() reads), reset afterwards."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    job = tmp_path / "sweep" / "job"
    job.mkdir(parents=True)
    cfg = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf)})
    cfg.hydra.runtime.output_dir = str(job)
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    yield job
    HydraConfig.instance().cfg = None


def test_a_job_refused_by_another_process_s_lock_writes_nothing_into_its_folder(multirun_job):
    """A second sweep runs a job that the first is running: the first's folder gets no error.txt of the refusal
    (the report would list the running job as failed); a job that fails on its own keeps its error.txt."""
    from ssn_exp.cli.errors import guard

    def start_in_locked_folder(cfg):
        with RunLock(multirun_job):
            with RunLock(multirun_job):  # the second process's RunLock, refused
                pass

    with pytest.raises(RunLockedError):
        guard(start_in_locked_folder, None)
    assert not (multirun_job / "error.txt").exists()

    def bad_setting(cfg):
        raise UserError("sigma must be a positive finite number, got -1")

    with pytest.raises(UserError):
        guard(bad_setting, None)
    assert (multirun_job / "error.txt").read_text() == "sigma must be a positive finite number, got -1\n"
