"""Hydra jobs that have no results: job directories without ``metrics.json`` (not finished, failed, or still
running) and, for a sweep that recorded its job list, jobs whose directory does not exist at all.

The job list of a sweep comes from its own record: ``sweep_jobs.json`` (written by ``python -m ssn_exp.sweep``)
or else Hydra's ``multirun.yaml`` (any ``python -m ssn_exp --multirun``). Both are read as plain data (JSON, safe
YAML): nothing in a sweep or run folder is imported or instantiated.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MissingRun",
    "SWEEP_RECORD",
    "find_missing",
    "jobs_from_params",
    "read_overrides",
    "read_sweep_record",
    "sweep_jobs",
]

#: The job list a sweep records in its directory (``python -m ssn_exp.sweep``).
SWEEP_RECORD = "sweep_jobs.json"


@dataclass(frozen=True)
class MissingRun:
    path: Path
    overrides: tuple[str, ...]
    error: str = ""  # the job's one-line error (error.txt) if it failed
    absent: bool = False  # a job of the sweep's record with no job directory at all

    def __str__(self) -> str:
        text = f"{self.path}: {' '.join(self.overrides) if self.overrides else '(no overrides recorded)'}"
        if self.absent:
            return f"{self.path}: {self.error}" if self.error else f"{text} -- no job directory"
        return f"{text} -- failed: {self.error}" if self.error else text

    @property
    def kind(self) -> str:
        return "no job directory" if self.absent else "no metrics.json"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_overrides(job_dir) -> tuple[str, ...]:
    """The override strings of a Hydra job (``.hydra/overrides.yaml``, a YAML list); () if unreadable."""
    text = _read_text(Path(job_dir) / ".hydra" / "overrides.yaml")
    if text is None:
        return ()
    try:
        import yaml

        data = yaml.safe_load(text)
        if isinstance(data, list):
            return tuple(" ".join(str(x).split()) for x in data)
    except Exception:  # noqa: BLE001 - fall back to reading "- item" lines
        pass
    return tuple(line.strip()[2:].strip().strip("'\"") for line in text.splitlines() if line.strip().startswith("- "))


def read_sweep_record(path) -> list[tuple[str, ...]]:
    """The jobs listed in a ``sweep_jobs.json`` (each a tuple of override strings); ValueError if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON sweep record ({exc})") from None
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list) or not all(
        isinstance(job, list) and all(isinstance(o, str) for o in job) for job in jobs
    ):
        raise ValueError(f'{path}: not a sweep record (an object with "jobs": a list of lists of overrides)')
    return [tuple(job) for job in jobs]


def jobs_from_params(params: dict[str, str], overrides: list[str] = ()) -> list[list[str]]:
    """The swept overrides of every job (:func:`ssn_exp.cli.sweep.jobs`) from the sweeper's params (key -> value string) and the overrides (Hydra's multirun.yaml holds
    both: the report reads a sweep's job list from it). A run certified by shard jobs (``certify.shard=0,1,...``)
    is one job: they share its directory."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = dict(params)
    for item in overrides:  # command-line sweeps, and fixed values of swept keys, replace the sweep's lists
        ov = parser.parse_override(item)
        if ov.is_sweep_override() or ov.get_key_element() in params:
            params[ov.get_key_element()] = item.split("=", 1)[1]
    params.pop("certify.shard", None)  # the shard jobs of one certification share its run: one job of the sweep
    lists = []
    for key, value in params.items():
        ov = parser.parse_override(f"{key}={value}")
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        lists.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*lists)]


def _multirun_jobs(path: Path) -> list[tuple[str, ...]]:
    """The jobs of a Hydra multirun from its ``multirun.yaml`` (its sweeper params and command-line overrides)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not YAML ({' '.join(str(exc).split())})") from None
    hydra = data.get("hydra") if isinstance(data, dict) else None
    sweeper = hydra.get("sweeper") if isinstance(hydra, dict) else None
    params = (sweeper.get("params") if isinstance(sweeper, dict) else None) or {}
    overrides = hydra.get("overrides") if isinstance(hydra, dict) else None
    task = (overrides.get("task") if isinstance(overrides, dict) else None) or []
    if not isinstance(params, dict) or not isinstance(task, list):
        raise ValueError(f"{path}: hydra.sweeper.params or hydra.overrides.task is not what Hydra writes")
    try:
        return [tuple(j) for j in jobs_from_params({str(k): str(v) for k, v in params.items()}, [str(t) for t in task])]
    except Exception as exc:  # noqa: BLE001 - Hydra's override parser: any failure means an unusable file
        raise ValueError(f"{path}: its overrides do not parse ({' '.join(str(exc).split())})") from None


def sweep_jobs(sweep_dir) -> list[tuple[str, ...]] | None:
    """The full job list of the sweep in ``sweep_dir`` from its record (None if it has none); ValueError if the
    record cannot be read."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / SWEEP_RECORD).is_file():
        return read_sweep_record(sweep_dir / SWEEP_RECORD)
    if (sweep_dir / "multirun.yaml").is_file():
        return _multirun_jobs(sweep_dir / "multirun.yaml")
    return None


def _sweep_dirs(p: Path) -> list[Path]:
    found = {x.parent for name in (SWEEP_RECORD, "multirun.yaml") for x in p.rglob(name) if x.is_file()}
    return sorted(found)


def find_missing(paths: Iterable) -> list[MissingRun]:
    """Every job dir (one holding ``.hydra/``) at or below the paths that has no ``metrics.json``, and every job of
    a sweep record (``sweep_jobs.json`` or ``multirun.yaml``) at or below them that has no job dir (``absent``).

    Folders of published arrays (with ``index.csv``) are skipped. A sweep record that cannot be read is listed
    too (its path, with the reason as ``error``): the report cannot say which jobs it lacks.
    """
    found: dict[Path, MissingRun] = {}
    absent: list[MissingRun] = []
    for p in map(Path, paths):
        if not p.is_dir() or (p / "index.csv").is_file():
            continue
        jobs_by_dir: dict[Path, tuple[str, ...]] = {}
        for hydra in sorted(p.rglob(".hydra")):
            job = hydra.parent
            if not hydra.is_dir():
                continue
            jobs_by_dir[job] = read_overrides(job)
            if not (job / "metrics.json").is_file():
                error = " ".join((_read_text(job / "error.txt") or "").split()) if (job / "error.txt").is_file() else ""
                found.setdefault(job.resolve(), MissingRun(job, jobs_by_dir[job], error))
        for sweep in _sweep_dirs(p):
            try:
                listed = sweep_jobs(sweep)
            except (OSError, ValueError) as exc:
                msg = " ".join(str(exc).split())
                absent.append(MissingRun(sweep, (), f"unreadable sweep record: {msg}", absent=True))
                continue
            present = [set(o) for d, o in jobs_by_dir.items() if sweep in d.parents]
            for job in listed or []:
                if not any(set(job) <= have for have in present):
                    absent.append(MissingRun(sweep, job, absent=True))
    unique = list(dict.fromkeys(absent))
    return sorted(found.values(), key=lambda m: _natural(m.path)) + unique


def _natural(path: Path) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)
