"""``python -m ssn_exp.sweep NAME [overrides...]``: run a named sweep, then its report.

A named sweep is a Hydra config ``conf/sweep/NAME.yaml``: its settings for every job and, in
``hydra.sweeper.params``, the swept values (one job per combination). The sweep runs as
``python -m ssn_exp --multirun sweep=NAME ...`` into ``outputs/sweeps/NAME/`` with a job directory per
combination, named by its overrides: jobs never overwrite each other, and running the same sweep again
resumes every unfinished job (finished ones are quick no-ops). A command-line override of a swept key
replaces its list. Afterwards the report (tables, curves, missing runs) is written to ``<sweep dir>/report/``;
``--launcher slurm`` returns once the jobs are submitted (``--wait``: waits, then reports). ``--plan`` prints what
the sweep costs and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from ssn_exp.atomic import replace_file
from ssn_exp.cli.config import CONF_DIR
from ssn_exp.cli.plan import plan_lines
from ssn_exp.exceptions import UserError
from ssn_exp.report.missing import SWEEP_RECORD, jobs_from_params, read_sweep_record

__all__ = ["available", "load_sweep", "jobs", "record_jobs", "sweep_command", "main"]

SWEEP_DIR = Path(CONF_DIR) / "sweep"
LAUNCHERS = {"basic": None, "local": "submitit_local", "slurm": "slurm"}


class _SweepTerminated(Exception):
    """SIGTERM reached python -m ssn_exp.sweep (forwarded to the jobs)."""


def available() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def load_sweep(name: str, overrides: list[str] = ()):
    """The composed config of the sweep (its ``hydra.sweeper.params`` included), with ``overrides`` applied."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if name not in available():
        raise SweepError(f"unknown sweep {name!r}; choose one of {', '.join(available())}")  # (main: exit 2)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"sweep={name}", *overrides], return_hydra_config=True)


def jobs(cfg, overrides: list[str] = ()) -> list[list[str]]:
    """The swept overrides of every job: the sweep's params, a command-line sweep of a key replacing its list."""
    return jobs_from_params({str(k): str(v) for k, v in (cfg.hydra.sweeper.params or {}).items()}, overrides)


def sweep_command(name: str, overrides: list[str], out_dir: Path, launcher: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "ssn_exp", "--multirun", f"sweep={name}", *overrides, f"hydra.sweep.dir={out_dir}"]
    if launcher:
        cmd.append(f"hydra/launcher={launcher}")
    return cmd


def record_jobs(out_dir: Path, name: str, all_jobs: list[list[str]]) -> Path:
    """Record the sweep's job list in ``out_dir/sweep_jobs.json`` (atomically, never through a symlink), so that the
    report names every job without results, even one whose directory was deleted. A sweep run again into the same
    directory adds its jobs to those recorded before (a narrower rerun does not forget the others)."""
    path = out_dir / SWEEP_RECORD
    jobs_ = [tuple(j) for j in all_jobs]
    if path.is_symlink() or path.exists():
        if path.is_symlink() or not path.is_file():
            raise SweepError(f"{path} is not a file ssn_exp wrote; move it away or give another --out DIR")
        try:
            jobs_ = list(dict.fromkeys([*read_sweep_record(path), *jobs_]))
        except (OSError, ValueError) as exc:
            raise SweepError(f"{exc}; move it away or give another --out DIR") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps({"sweep": name, "jobs": [list(j) for j in jobs_]}, indent=1) + "\n")
    return path


class SweepError(UserError, ValueError):
    """A sweep directory that cannot take this sweep (reported in one line)."""


def _count_done(out_dir: Path) -> int:
    return sum(1 for p in out_dir.rglob("metrics.json") if (p.parent / ".hydra").is_dir())


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (``error: ...``, exit status 2) instead of usage + message."""

    def error(self, message: str):
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    parser = _Parser(
        prog="python -m ssn_exp.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sweeps: "
        + ", ".join(available())
        + "\nexamples:\n  python -m ssn_exp.sweep smoke\n  python -m ssn_exp.sweep paper_cifar10 --launcher slurm "
        "hydra.launcher.partition=gpu\n  python -m ssn_exp.sweep smoke debug=fast --dry-run",
    )
    parser.add_argument("name", help="a sweep in conf/sweep/ (" + ", ".join(available()) + ")")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (replace swept params)")
    parser.add_argument("--out", type=Path, help="sweep directory (default: outputs/sweeps/NAME)")
    parser.add_argument(
        "--launcher",
        choices=sorted(LAUNCHERS),
        default="basic",
        help="basic: jobs one after the other here; local: submitit processes here; slurm: one Slurm job per point",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and the command, run nothing")
    parser.add_argument("--no-report", action="store_true", help="skip the report after the sweep")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="--launcher slurm: wait for the jobs to end, then write the report (default: return once submitted)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print each job's training and certification cost, hours and whether it fits the launcher's "
        "timeout_min (slurm's unless --launcher says otherwise), then the total; needs no data, runs nothing",
    )
    parser.add_argument(
        "--throughput",
        type=float,
        metavar="PASSES_PER_S",
        help="for --plan: forward passes per second of your GPU (default: the authors' published times)",
    )
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides

    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser_ = OverridesParser.create()
        fixed = [
            o for o in args.overrides if not o.startswith("hydra") and not parser_.parse_override(o).is_sweep_override()
        ]
        cfg = load_sweep(args.name, fixed)
        all_jobs = jobs(cfg, [o for o in args.overrides if not o.startswith("hydra")])
    except Exception as exc:  # noqa: BLE001 - a bad override or option: one line
        from ssn_exp.cli.messages import one_line

        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.plan:  # composed as the jobs would be, nothing written
        if args.throughput is not None and not args.throughput > 0:
            print(f"error: --throughput must be > 0 forward passes per second, got {args.throughput}", file=sys.stderr)
            return 2
        launcher = LAUNCHERS[args.launcher] if args.launcher != "basic" else "slurm"
        print(f"sweep {args.name}: {cfg.sweep_info.description}; {len(all_jobs)} jobs, hydra/launcher={launcher}")
        try:
            fixed.append(f"hydra/launcher={launcher}")
            lines = plan_lines(lambda job: load_sweep(args.name, [*fixed, *job]), fixed, all_jobs, args.throughput)
        except Exception as exc:  # noqa: BLE001 - a job whose config does not compose or check: one line
            from ssn_exp.cli.messages import one_line

            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 0
    out_dir = (args.out or Path("outputs") / "sweeps" / args.name).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: {out_dir} is a file, not a folder: give the sweep a folder (--out DIR)", file=sys.stderr)
        return 2
    cmd = sweep_command(args.name, args.overrides, out_dir, LAUNCHERS[args.launcher])
    print(f"sweep {args.name}: {cfg.sweep_info.description}\n{len(all_jobs)} jobs into {out_dir}")
    print("command: " + shlex.join(cmd), flush=True)
    if args.dry_run:
        for i, job in enumerate(all_jobs):
            print(f"  [{i}] {' '.join(job)}")
        return 0
    resume = f"run the same command again to resume: the finished jobs in {out_dir} are kept"
    try:
        record_jobs(out_dir, args.name, all_jobs)
    except (SweepError, OSError) as exc:
        from ssn_exp.cli.messages import one_line

        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    submit_only = args.launcher == "slurm" and not args.wait
    env = {**os.environ, "SSN_EXP_IN_SWEEP": "1", "SSN_EXP_SUBMIT_ONLY": "1" if submit_only else "0"}
    proc = subprocess.Popen(cmd, env=env)

    def forward_sigterm(signum, frame):  # Slurm/submitit stop the sweep: stop the jobs too, then say so
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        proc.send_signal(signal.SIGTERM)
        raise _SweepTerminated

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        rc = proc.wait()
    except _SweepTerminated:
        proc.wait()
        print(
            f"error: terminated by SIGTERM after {_count_done(out_dir)} of {len(all_jobs)} jobs; {resume}",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # the jobs got the same Ctrl-C: let them stop cleanly, then say how to resume
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        proc.wait()
        print(f"error: interrupted after {_count_done(out_dir)} of {len(all_jobs)} jobs; {resume}", file=sys.stderr)
        return 130
    if submit_only and rc == 0:  # the jobs run on: say where their results go and how to follow them
        report = shlex.join([sys.executable, "-m", "ssn_exp.report", str(out_dir), "--out", str(out_dir / "report")])
        print(
            f"submitted: results go to {out_dir}/<job>/ (Slurm logs in {out_dir}/.submitit/)\n"
            f"follow:    squeue -u $USER\n"
            f"report:    {report}   (lists the jobs without results while some are missing)\n"
            f"resume:    the same command again resubmits; finished jobs are quick no-ops"
        )
        return 0
    done = _count_done(out_dir)
    if rc == 130 or rc == -signal.SIGINT:
        print(f"error: interrupted after {done} of {len(all_jobs)} jobs; {resume}", file=sys.stderr)
        return 130
    if rc != 0:
        if done == 0:
            print(
                f"error: all {len(all_jobs)} jobs of sweep {args.name} failed; each job directory's error.txt "
                "or log says why",
                file=sys.stderr,
            )
        else:
            print(
                f"error: {len(all_jobs) - done} of {len(all_jobs)} jobs of sweep {args.name} failed (exit {rc}); "
                f"the report lists the missing runs; {resume}",
                file=sys.stderr,
            )
    if not args.no_report and done:  # the report (layer 4) reads the result files, in its own process
        # --allow-missing: this command's own exit status and error line already say which jobs failed
        report = [sys.executable, "-m", "ssn_exp.report", str(out_dir), "--out", str(out_dir / "report")]
        subprocess.call([*report, "--allow-missing"])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
