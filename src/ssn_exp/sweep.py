"""``python -m ssn_exp.sweep NAME [overrides...]``: run a named sweep from ``sweeps/NAME.yaml``.

A sweep file lists swept ``params`` (one job per combination) and fixed ``overrides``. The sweep
runs as one Hydra ``--multirun`` of ``python -m ssn_exp`` into ``outputs/sweeps/NAME/`` with a job
directory per combination, named by its overrides: jobs never overwrite each other, and running
the same sweep again resumes every unfinished job (finished ones are quick no-ops). Afterwards the
report (tables, curves, missing runs) is written to ``outputs/sweeps/NAME/report/``.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SWEEPS_DIR = ROOT / "sweeps"
#: Keys that do not change a job's results: left out of its directory name.
NON_SEMANTIC = ["certify.progress", "trainer.enable_progress_bar", "logger", "print_config", "hydra.verbose"]
LAUNCHERS = {"basic": None, "local": "submitit_local", "slurm": "slurm"}

__all__ = ["available", "load_sweep", "sweep_command", "jobs", "main"]


def available() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def load_sweep(name: str) -> dict:
    path = SWEEPS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: unknown sweep {name!r}; choose one of {', '.join(available())}")
    spec = yaml.safe_load(path.read_text()) or {}
    spec.setdefault("params", {})
    spec.setdefault("overrides", [])
    return spec


def _as_list(values) -> list:
    return list(values) if isinstance(values, list | tuple) else [values]


def jobs(spec: dict, extra: list[str] = ()) -> list[list[str]]:
    """The override list of every job (extra key=value overrides replace a swept param)."""
    extra_keys = {e.split("=", 1)[0] for e in extra}
    params = {k: _as_list(v) for k, v in spec["params"].items() if k not in extra_keys}
    fixed = [o for o in spec["overrides"] if o.split("=", 1)[0] not in extra_keys] + list(extra)
    keys = list(params)
    return [
        [f"{k}={v}" for k, v in zip(keys, combo, strict=True)] + fixed for combo in itertools.product(*params.values())
    ]


def sweep_command(name: str, spec: dict, extra: list[str], out_dir: Path, launcher: str | None) -> list[str]:
    extra_keys = {e.split("=", 1)[0] for e in extra}
    swept = [
        f"{k}={','.join(str(v) for v in _as_list(vals))}" for k, vals in spec["params"].items() if k not in extra_keys
    ]
    fixed = [o for o in spec["overrides"] if o.split("=", 1)[0] not in extra_keys]
    cmd = [sys.executable, "-m", "ssn_exp", "--multirun", *swept, *fixed, *extra]
    # Job directories are named by what varies inside the sweep: the sweep's own fixed overrides
    # (the same for every job) and the cosmetic keys are left out of the name.
    exclude = NON_SEMANTIC + [o.split("=", 1)[0] for o in fixed]
    cmd += [
        f"hydra.sweep.dir={out_dir}",
        "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(exclude) + "]",
    ]
    if launcher:
        cmd.append(f"hydra/launcher={launcher}")
    return cmd


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssn_exp.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sweeps: "
        + ", ".join(available())
        + "\nexamples:\n  python -m ssn_exp.sweep smoke\n  python -m ssn_exp.sweep paper_cifar10 --launcher slurm "
        "hydra.launcher.partition=gpu\n  python -m ssn_exp.sweep smoke debug=fast --dry-run",
    )
    parser.add_argument("name", help="a sweep in sweeps/ (" + ", ".join(available()) + ")")
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
    args = parser.parse_args(argv)

    spec = load_sweep(args.name)
    out_dir = (args.out or Path("outputs") / "sweeps" / args.name).absolute()
    cmd = sweep_command(args.name, spec, args.overrides, out_dir, LAUNCHERS[args.launcher])
    all_jobs = jobs(spec, args.overrides)
    print(f"sweep {args.name}: {spec.get('description', '')}\n{len(all_jobs)} jobs into {out_dir}")
    print("command: " + shlex.join(cmd), flush=True)
    if args.dry_run:
        for i, job in enumerate(all_jobs):
            print(f"  [{i}] {' '.join(job)}")
        return 0
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"sweep {args.name}: some jobs failed (exit {rc}); the report lists the missing runs", file=sys.stderr)
    if not args.no_report:
        from ssn_exp.report.cli import main as report_main

        report_main([str(out_dir), "--out", str(out_dir / "report")])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
