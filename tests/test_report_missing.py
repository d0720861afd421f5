"""Issue 16 section 3 (second half): the report knows a sweep's full job list from the sweep's own record and names
every job it lacks, even one whose directory was deleted, exiting non-zero unless --allow-missing; and it never
instantiates anything named in a sweep or run folder."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import run_cli
from ssn_exp.cli.sweep import SweepError, record_jobs
from ssn_exp.report import main
from ssn_exp.report.missing import SWEEP_RECORD, find_missing, jobs_from_params, read_sweep_record

GOOD_CSV = "index,label,prediction,correct,radius,k\n0,1,1,1,0.25,4\n1,2,3,0,0.0,0\n"


def _job(sweep, name, overrides, done=True, sigma=0.5):
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if done:
        meta = {"dataset": "digits", "method": "dssn", "training": "standard", "sigma": sigma, "q": 16, "n_examples": 2}
        (d / "metrics.json").write_text(json.dumps(meta))
        (d / "certificates.csv").write_text(GOOD_CSV)
    return d


JOBS = [["method=dssn", "sigma=0.5"], ["method=dssn", "sigma=1.0"], ["method=dssn", "sigma=2.0"]]


@pytest.fixture
def sweep(tmp_path):
    """A sweep of three jobs that recorded its job list; job 2's directory was deleted."""
    root = tmp_path / "sweep"
    record_jobs(root, "mine", JOBS)
    _job(root, "method=dssn,sigma=0.5", ["sweep=mine", *JOBS[0]], sigma=0.5)
    _job(root, "method=dssn,sigma=1.0", ["sweep=mine", *JOBS[1]], sigma=1.0)
    return root


def test_a_deleted_job_directory_is_named_and_the_exit_status_says_partial(sweep, tmp_path, capsys):
    rc = main([str(sweep), "--out", str(tmp_path / "out"), "--no-plots"])
    captured = capsys.readouterr()
    assert rc == 1
    err = captured.err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("error: partial results: 1 job(s) missing") and "--allow-missing" in err[0]
    )
    missing = (tmp_path / "out" / "missing.txt").read_text()
    assert missing.strip() == f"missing (no job directory): {sweep}: method=dssn sigma=2.0 -- no job directory"
    assert "sigma=0.5" not in missing and "sigma=1.0" not in missing
    assert "0 job(s) without metrics.json, 1 job(s) of the sweep without a job directory" in captured.out
    # asked for a partial report: the same files, exit 0, a warning
    rc = main([str(sweep), "--out", str(tmp_path / "out2"), "--no-plots", "--allow-missing"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and len(err) == 1 and err[0].startswith("warning: partial results: 1 job(s) missing")
    assert (tmp_path / "out2" / "missing.txt").read_text() == missing


def test_a_complete_sweep_has_nothing_missing(sweep, tmp_path, capsys):
    _job(sweep, "method=dssn,sigma=2.0", ["sweep=mine", *JOBS[2]], sigma=2.0)
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "out" / "missing.txt").read_text().strip() == "none"


def test_a_job_directory_without_results_and_an_absent_one_are_both_named(sweep):
    _job(sweep, "method=dssn,sigma=2.0", ["sweep=mine", *JOBS[2]], done=False)
    shutil.rmtree(sweep / "method=dssn,sigma=1.0")
    missing = find_missing([sweep])
    assert [(m.kind, m.overrides) for m in missing] == [
        ("no metrics.json", ("sweep=mine", "method=dssn", "sigma=2.0")),
        ("no job directory", ("method=dssn", "sigma=1.0")),
    ]


def test_a_hydra_multirun_without_our_record_uses_hydras_multirun_yaml(tmp_path):
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params: null\n  overrides:\n    task:\n    - method=uniform,dssn\n    - sigma=0.5\n"
        "    - debug=fast\nmodel:\n  _target_: os.system\n"
    )
    _job(root, "0", ["method=uniform", "sigma=0.5", "debug=fast"])
    assert [m.overrides for m in find_missing([root])] == [("method=dssn",)]  # the swept values name a job
    (root / SWEEP_RECORD).write_text(json.dumps({"jobs": [["method=uniform"]]}))  # our record takes precedence
    assert find_missing([root]) == []


def test_an_unreadable_sweep_record_is_listed_not_ignored(sweep, tmp_path, capsys):
    (sweep / SWEEP_RECORD).write_text('{"jobs": "all of them"}')
    missing = find_missing([sweep])
    assert (
        len(missing) == 1 and "unreadable sweep record" in str(missing[0]) and "not a sweep record" in str(missing[0])
    )
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--no-plots"]) == 1
    assert "error: partial results" in capsys.readouterr().err


def test_the_sweep_record_adds_to_the_jobs_recorded_before_and_refuses_other_files(tmp_path):
    path = record_jobs(tmp_path, "mine", JOBS[:2])
    record_jobs(tmp_path, "mine", [JOBS[1], JOBS[2]])  # a narrower or other rerun does not forget jobs
    assert read_sweep_record(path) == [tuple(j) for j in JOBS]
    assert json.loads(path.read_text())["sweep"] == "mine"
    assert [p.name for p in tmp_path.iterdir()] == [SWEEP_RECORD]  # no temporary file left
    path.write_text("my notes\n")
    with pytest.raises(SweepError, match="not a JSON sweep record"):
        record_jobs(tmp_path, "mine", JOBS)
    assert path.read_text() == "my notes\n"
    path.unlink()
    path.symlink_to(tmp_path / "target")
    with pytest.raises(SweepError, match="is not a file ssn_exp wrote"):
        record_jobs(tmp_path, "mine", JOBS)
    assert not (tmp_path / "target").exists()


def test_jobs_from_params_is_the_sweeps_own_expansion():
    assert jobs_from_params({"method": "uniform,dssn"}, ["sigma=0.5,1.0", "debug=fast"]) == [
        ["method=uniform", "sigma=0.5"],
        ["method=uniform", "sigma=1.0"],
        ["method=dssn", "sigma=0.5"],
        ["method=dssn", "sigma=1.0"],
    ]


def test_the_report_instantiates_nothing_from_a_sweep_or_run_folder(sweep, tmp_path, capsys):
    """Targets in every file the report could read: none is imported or called (the marker file stays absent)."""
    marker = tmp_path / "PWNED"
    target = {"_target_": "pathlib.Path.touch", "self": str(marker)}
    call = f"model:\n  _target_: os.system\n  _args_: ['touch {marker}']\n"
    for job in sweep.iterdir():
        if (job / ".hydra").is_dir():
            (job / ".hydra" / "config.yaml").write_text(call)
            (job / ".hydra" / "hydra.yaml").write_text(
                f"hydra:\n  callbacks:\n    x:\n      _target_: os.system\n{call}"
            )
            meta = json.loads((job / "metrics.json").read_text())
            (job / "metrics.json").write_text(json.dumps({**meta, "model": target, "extra": target}))
    (sweep / "multirun.yaml").write_text(call)
    record = json.loads((sweep / SWEEP_RECORD).read_text())
    (sweep / SWEEP_RECORD).write_text(json.dumps({**record, "launcher": target}))
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--no-plots", "--allow-missing"]) == 0
    capsys.readouterr()
    assert not marker.exists()


@pytest.mark.slow
def test_a_real_sweep_records_its_jobs_and_the_report_names_a_deleted_one(tmp_path):
    """python -m ssn_exp.sweep records the job list before the jobs run (here they fail at once: sigma=-1)."""
    out = tmp_path / "sw"
    p = run_cli("ssn_exp.sweep", "smoke", "debug=fast", "sigma=-1", "--out", str(out), "--no-report")
    assert p.returncode != 0
    assert read_sweep_record(out / SWEEP_RECORD) == [
        ("method=uniform", "sigma=-1"), ("method=ssn", "sigma=-1"), ("method=dssn", "sigma=-1"),
        ("method=laplace", "sigma=-1"),
    ]  # fmt: skip
    shutil.rmtree(next(d for d in out.iterdir() if "method=ssn" in d.name))
    missing = find_missing([out])
    assert {m.kind for m in missing} == {"no metrics.json", "no job directory"}
    assert [m.overrides for m in missing if m.absent] == [("method=ssn", "sigma=-1")]
